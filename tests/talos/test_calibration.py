"""calibrate_masks: exact density, shrinking masks, the soft mask, untouched weights, clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from talos import calibrate_masks, fisher_scores, mask_density, mask_report, round_densities, soft_masked
from talos.calibration import keep_lowest, kept_count

from .conftest import ToyText, ToyViT, image_batches, token_batches


def fwd(model, batch):
    return model(batch)


def total_entries(masks):
    return sum(m.numel() for m in masks.values())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_exact_density_and_monotone_shrinking(sparsity, rounds):
    torch.manual_seed(0)
    model = ToyViT()
    history = []
    masks = calibrate_masks(model, image_batches(2, 4), fwd, sparsity=sparsity, rounds=rounds, progress=False,
                            generator=torch.Generator().manual_seed(0),
                            callback=lambda r, d, m: history.append((r, d, {k: v.clone() for k, v in m.items()})))
    N = total_entries(masks)
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept - math.floor((1 - sparsity) * N)) <= 1
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in masks.values())
    assert [r for r, _, _ in history] == list(range(1, rounds + 1))
    for (r, d, m), prev in zip(history, [None] + [h[2] for h in history[:-1]]):
        assert sum(int(x.sum()) for x in m.values()) == kept_count(d, N)
        if prev is not None:  # masks only shrink
            assert all(not (m[k] & ~prev[k]).any() for k in m)
    assert all(torch.equal(history[-1][2][k], masks[k]) for k in masks)


def test_round_densities():
    assert round_densities(0.9, 4) == pytest.approx([0.1 ** 0.25, 0.1 ** 0.5, 0.1 ** 0.75, 0.1])
    assert [round(d, 3) for d in round_densities(0.9, 4)] == [0.562, 0.316, 0.178, 0.1]
    assert kept_count(1 - 0.9, 1000) == 100  # (1 - 0.9) is 0.0999..., still 100 entries


def test_single_round_keeps_the_lowest_scores():
    torch.manual_seed(0)
    model, data = ToyViT(), image_batches(2, 4)
    names = [n for n, _ in model.named_parameters() if n != "pos"]
    masks = calibrate_masks(model, data, fwd, sparsity=0.7, rounds=1, params=names, progress=False,
                            generator=torch.Generator().manual_seed(3))
    # calibration seeds each batch's label draws from one draw of the generator per round
    base = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
    per_batch = [fisher_scores(model, [b], fwd, params=names, generator=torch.Generator().manual_seed(base + i))
                 for i, b in enumerate(data)]
    scores = {n: sum(s[n].double() for s in per_batch) for n in names}
    kept = torch.cat([scores[n][masks[n]] for n in names])
    dropped = torch.cat([scores[n][~masks[n]] for n in names])
    assert kept.max() <= dropped.min()


def test_ties_are_broken_deterministically_in_name_order():
    scores = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    keep = {"a": torch.ones(2, 3, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    out = keep_lowest(scores, keep, 4, ["a", "b"])
    assert out["a"].flatten().tolist() == [True, True, True, True, False, False]
    assert not out["b"].any()
    # dropped entries are never selected again, even with lower scores
    keep2 = {"a": torch.tensor([[False, True, True], [True, True, True]]), "b": keep["b"]}
    scores2 = {"a": torch.tensor([[-5.0, 1, 1], [1, 1, 1]]), "b": torch.tensor([0.0, 2, 2, 2])}
    out2 = keep_lowest(scores2, keep2, 2, ["a", "b"])
    assert out2["a"].flatten().tolist() == [False, True, False, False, False, False]
    assert out2["b"].tolist() == [True, False, False, False]


def test_weights_bitwise_unchanged_and_structure_restored():
    torch.manual_seed(0)
    model = ToyText()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = [n for n, _ in model.named_parameters()]
    classes = {n: type(m) for n, m in model.named_modules()}
    calibrate_masks(model, token_batches(2, 4), fwd, sparsity=0.9, target="log_prob", progress=False)
    assert [n for n, _ in model.named_parameters()] == order
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p.grad is None for p in model.parameters())


def test_soft_mask_scales_dropped_weights_in_forward_and_changes_later_scores():
    torch.manual_seed(0)
    model, data = ToyViT(), image_batches(1, 4)
    w = model.mlp[0].weight.detach().clone()
    keep = {"mlp.0.weight": torch.rand(w.shape) < 0.5}
    with soft_masked(model, keep, 0.1):
        inside = model.mlp[0].weight.detach().clone()
        out_masked = model(data[0])
    assert torch.equal(inside, torch.where(keep["mlp.0.weight"], w, w * 0.1))
    assert torch.equal(model.mlp[0].weight, w) and not torch.allclose(out_masked, model(data[0]))
    # later rounds see the soft-masked network: masks differ from a run without soft masking
    kw = dict(sparsity=0.9, rounds=4, progress=False)
    soft = calibrate_masks(model, data, fwd, soft_mask=0.1, generator=torch.Generator().manual_seed(0), **kw)
    none = calibrate_masks(model, data, fwd, soft_mask=1.0, generator=torch.Generator().manual_seed(0), **kw)
    assert any(not torch.equal(soft[k], none[k]) for k in soft)
    assert mask_density(soft) == pytest.approx(mask_density(none), abs=1e-9)


def test_reproducible_with_seeded_generator_and_max_batches():
    torch.manual_seed(0)
    model, data = ToyText(), token_batches(3, 4)
    run = lambda mb: calibrate_masks(model, data, fwd, max_batches=mb, target="log_prob",  # noqa: E731
                                     generator=torch.Generator().manual_seed(5), progress=False)
    a, b = run(None), run(None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run(1)
    assert all(c[k].shape == a[k].shape for k in a)


def test_mask_report():
    masks = {"x": torch.tensor([True, False, False, False]), "y": torch.ones(2, 2, dtype=torch.bool)}
    assert mask_report(masks) == [{"name": "x", "kept": 1, "total": 4, "density": 0.25},
                                  {"name": "y", "kept": 4, "total": 4, "density": 1.0}]
    assert mask_density(masks) == 5 / 8


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "a lot"])
def test_bad_sparsity_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        calibrate_masks(ToyViT(), image_batches(1, 2), fwd, sparsity=bad, progress=False)


def test_other_bad_inputs_raise():
    model, data = ToyViT(), image_batches(1, 2)
    with pytest.raises(ValueError, match="rounds"):
        calibrate_masks(model, data, fwd, rounds=0, progress=False)
    with pytest.raises(ValueError, match="soft_mask"):
        calibrate_masks(model, data, fwd, soft_mask=2.0, progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        calibrate_masks(model, iter(data), fwd, rounds=2, progress=False)
    with pytest.raises(ValueError, match="unknown parameter"):
        calibrate_masks(model, data, fwd, params=["missing"], progress=False)


@pytest.mark.parametrize("kind", ["uniform", "negative", "zeros_and_inf", "few_values", "heavy_tail"])
def test_radix_kth_smallest_equals_kthvalue(kind):
    from talos.calibration import _kth_smallest

    g = torch.Generator().manual_seed(0)
    n = 2**20 + 37  # large enough for the radix path
    x = {
        "uniform": lambda: torch.rand(n, generator=g),
        "negative": lambda: -torch.rand(n, generator=g),
        "zeros_and_inf": lambda: torch.cat([torch.zeros(n // 3), -torch.zeros(n // 3),
                                            torch.full((n - 2 * (n // 3),), float("inf"))]),
        "few_values": lambda: torch.randint(0, 5, (n,), generator=g).float(),
        "heavy_tail": lambda: torch.randn(n, generator=g).exp() ** 8,
    }[kind]()
    for k in (1, 2, n // 10, n // 2, n - 1, n):
        assert _kth_smallest(x, k).item() == torch.kthvalue(x, k).values.item()


def test_zero_score_entries_act_like_an_unused_eligible_tensor():
    """The official vision code also scores the text tower's leftover ln_final (gradient 0, so always kept):
    counting its entries with zero_score_entries gives the same masks as scoring a real unused tensor."""
    torch.manual_seed(0)
    model, data = ToyViT(), image_batches(2, 4)
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(37)))  # never touched by forward
    names = [n for n, _ in model.named_parameters() if n != "unused"]
    kw = dict(sparsity=0.9, rounds=4, progress=False)
    with_unused = calibrate_masks(model, data, fwd, params=names + ["unused"],
                                  generator=torch.Generator().manual_seed(1), **kw)
    counted = calibrate_masks(model, data, fwd, params=names, zero_score_entries=37,
                              generator=torch.Generator().manual_seed(1), **kw)
    assert bool(with_unused["unused"].all())
    assert all(torch.equal(with_unused[n], counted[n]) for n in names)
    plain = calibrate_masks(model, data, fwd, params=names, generator=torch.Generator().manual_seed(1), **kw)
    N = sum(m.numel() for m in plain.values())
    kept = lambda m: sum(int(x.sum()) for x in m.values())  # noqa: E731
    assert kept(counted) == kept_count(0.1, N + 37) - 37 != kept(plain)


def test_skipping_dropped_entries_gives_the_masks_of_full_scoring(monkeypatch):
    """Rounds after the first score only the entries still kept; the masks equal those of scoring everything."""
    from torch import nn

    import talos.fisher as fisher
    from talos.fisher import FisherScorer

    monkeypatch.setattr(fisher, "_NEED_BLOCK", 2**13)  # blocks of ~32 rows on these small matrices
    calls = []
    blocked = fisher._sq_outer_sum_needed
    monkeypatch.setattr(fisher, "_sq_outer_sum_needed", lambda *a: calls.append(1) or blocked(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 320), nn.GELU(), nn.Linear(320, 288), nn.GELU(), nn.Linear(288, 7))
    data = [torch.randn(6, 5, 256) for _ in range(2)]

    def fwd(m, b):
        return m(b).mean(1)

    kw = dict(sparsity=0.95, rounds=4, progress=False)
    skipped = calibrate_masks(model, data, fwd, generator=torch.Generator().manual_seed(0), **kw)
    assert calls  # the later rounds took the blocked path
    score = FisherScorer.score
    monkeypatch.setattr(FisherScorer, "score", lambda self, *a, needed=None, **k: score(self, *a, **k))
    full = calibrate_masks(model, data, fwd, generator=torch.Generator().manual_seed(0), **kw)
    assert all(torch.equal(skipped[k], full[k]) for k in full)


def test_keep_lowest_never_reselects_and_keeps_everything_when_k_covers_the_kept():
    scores = {"a": torch.tensor([0.5, 0.1, 0.3, 0.2])}
    keep = {"a": torch.tensor([True, False, True, True])}
    assert keep_lowest(scores, keep, 2, ["a"])["a"].tolist() == [False, False, True, True]  # 0.1 is dropped
    assert keep_lowest(scores, keep, 3, ["a"])["a"].tolist() == [True, False, True, True]
    assert keep_lowest(scores, keep, 4, ["a"])["a"].tolist() == [True, False, True, True]  # k > kept: all kept
