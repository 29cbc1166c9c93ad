"""fisher_scores must equal a brute-force one-example-at-a-time loop, on every module type it handles."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from talos import fisher_scores, fisher_scores_reference, register_per_example_rule
from talos.fisher import draw_labels, per_example_objective

from .conftest import ToyText, ToyViT, image_batches, open_clip_vit, token_batches


def brute_force(model, batches, forward_fn, names, target, draws, seed):
    """Independent reference: labels drawn from the batched scores, gradients from single-example forwards."""
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    plist = [named[n] for n in names]
    out = {n: torch.zeros_like(named[n]) for n in names}
    was = model.training
    model.eval()
    for batch in batches:
        with torch.no_grad():
            labels = draw_labels(forward_fn(model, batch), draws, gen)  # (B, draws)
        for i in range(batch.shape[0]):
            scores = forward_fn(model, batch[i : i + 1])  # one example at a time
            obj = per_example_objective(scores, labels[i : i + 1], target)[0]
            for d in range(draws):
                gs = torch.autograd.grad(obj[d], plist, retain_graph=True, allow_unused=True)
                for n, g in zip(names, gs):
                    if g is not None:
                        out[n] += g.square()
    model.train(was)
    return out


def assert_close_scores(fast, ref, rtol=1e-4):
    assert fast.keys() == ref.keys()
    for n in ref:
        scale = ref[n].abs().max().clamp_min(1e-12)
        err = (fast[n] - ref[n]).abs().max() / scale
        assert err <= rtol, f"{n}: relative error {err:.2e}"


def fwd(model, batch):
    return model(batch)


CASES = {
    "vit": (ToyViT, lambda: image_batches(2, 5)),
    "text": (ToyText, lambda: token_batches(2, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", ["logit", "log_prob"])
@pytest.mark.parametrize("draws", [1, 3])
def test_matches_brute_force(case, target, draws):
    torch.manual_seed(0)
    cls, data = CASES[case]
    model, batches = cls(), data()
    names = [n for n, _ in model.named_parameters()]
    fast = fisher_scores(model, batches, fwd, target=target, draws=draws, generator=torch.Generator().manual_seed(7))
    ref = brute_force(model, batches, fwd, names, target, draws, seed=7)
    assert_close_scores(fast, ref)
    # the anchor algorithm (one batched forward, one backward per example) agrees too
    anchor = fisher_scores_reference(model, batches, fwd, target=target, draws=draws,
                                     generator=torch.Generator().manual_seed(7))
    assert_close_scores(anchor, ref)


def test_supported_modules_take_the_fast_path(caplog):
    torch.manual_seed(0)
    model = ToyViT()
    names = [n for n, _ in model.named_parameters() if n != "pos"]
    with caplog.at_level(logging.WARNING, logger="talos"):
        fisher_scores(model, image_batches(1, 4), fwd, params=names)
    assert "fallback" not in caplog.text
    report: dict = {}
    with caplog.at_level(logging.WARNING, logger="talos"):
        fisher_scores(model, image_batches(1, 4), fwd, report=report)
    # `pos` is used directly in the model's forward: followed through the add that consumes it, no fallback
    assert "fallback" not in caplog.text
    assert report["fallback"] == set() and report["direct"] == {"pos"}


def test_open_clip_vision_transformer():
    model = open_clip_vit()
    batches = [torch.randn(3, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    names = [n for n, _ in model.named_parameters()]  # includes class/positional embedding and proj (fallback)
    fast = fisher_scores(model, batches, fwd, target="logit", generator=torch.Generator().manual_seed(1))
    assert_close_scores(fast, brute_force(model, batches, fwd, names, "logit", 1, seed=1))


class SeqFirst(nn.Module):
    """Linear and LayerNorm applied to (T, B, D) activations, a module called twice, and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)  # called twice
        self.tied = nn.Linear(6, 6, bias=False)
        self.tied2 = nn.Linear(6, 6, bias=False)
        self.tied2.weight = self.tied.weight
        self.out = nn.Linear(6, 4)

    def forward(self, x):  # x (B, T, 3)
        h = self.ln(self.inp(x.transpose(0, 1)))  # (T, B, 6)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = self.tied2(torch.tanh(self.tied(h)))
        return self.out(h.mean(0))


def test_seq_first_reused_and_tied_modules_are_exact():
    torch.manual_seed(0)
    model = SeqFirst()
    batches = [torch.randn(4, 5, 3), torch.randn(3, 5, 3)]
    names = [n for n, _ in model.named_parameters()]
    fast = fisher_scores(model, batches, fwd, target="log_prob", generator=torch.Generator().manual_seed(2))
    assert_close_scores(fast, brute_force(model, batches, fwd, names, "log_prob", 1, seed=2))


def test_small_chunks_give_the_same_scores():
    torch.manual_seed(0)
    model, batches = ToyViT(), image_batches(1, 6)
    a = fisher_scores(model, batches, fwd, generator=torch.Generator().manual_seed(0))
    b = fisher_scores(model, batches, fwd, generator=torch.Generator().manual_seed(0), chunk_elements=1)
    assert_close_scores(b, a, rtol=1e-6)


def test_model_left_untouched():
    torch.manual_seed(0)
    model = ToyViT()
    model.train()
    model.head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = [n for n, _ in model.named_parameters()]
    scores = fisher_scores(model, image_batches(1, 3), fwd, params=["mlp.0.weight", "ln1.bias"])
    assert set(scores) == {"mlp.0.weight", "ln1.bias"}
    assert scores["mlp.0.weight"].shape == model.mlp[0].weight.shape and scores["mlp.0.weight"].dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    assert not model.head.weight.requires_grad and model.mlp[0].weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [n for n, _ in model.named_parameters()] == order
    assert "forward" not in model.attn.__dict__  # the MHA observation patch is gone


def test_seeded_draws_are_reproducible_and_seed_dependent():
    torch.manual_seed(0)
    model, batches = ToyText(), token_batches(1, 6)
    run = lambda s: fisher_scores(model, batches, fwd, target="log_prob", draws=2,  # noqa: E731
                                  generator=torch.Generator().manual_seed(s))
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


class Scale(nn.Module):
    """y = x * w: a module type the library does not know."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


def test_registered_rule_is_used_and_exact(caplog):
    def rule(m, inputs, g):  # per-example grad of w: sum over tokens of x * g
        x = inputs[0]
        pe = (x * g).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
        return {"w": pe.square().sum(0)}

    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))
    batches = [torch.randn(5, 2, 3)]
    fwd2 = lambda m, b: m(b).mean(1)  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    ref = brute_force(model, batches, fwd2, names, "logit", 1, seed=0)
    report: dict = {}
    with caplog.at_level(logging.WARNING, logger="talos"):
        followed = fisher_scores(model, batches, fwd2, generator=torch.Generator().manual_seed(0), report=report)
    # unknown module: its parameter is followed through the multiply that consumes it (no fallback)
    assert "fallback" not in caplog.text and report["direct"] == {"1.w"} and not report["fallback"]
    assert_close_scores(followed, ref)
    register_per_example_rule(Scale, rule)
    try:
        caplog.clear()
        report = {}
        with caplog.at_level(logging.WARNING, logger="talos"):
            fast = fisher_scores(model, batches, fwd2, generator=torch.Generator().manual_seed(0), report=report)
        assert "fallback" not in caplog.text and not report["direct"]  # the registered rule is used
        assert_close_scores(fast, ref)
    finally:
        from talos.fisher import _RULES

        _RULES.pop(Scale)


def test_bad_inputs_raise():
    model = ToyViT()
    b = image_batches(1, 2)
    with pytest.raises(ValueError, match="unknown parameter"):
        fisher_scores(model, b, fwd, params=["nope"])
    with pytest.raises(ValueError, match="Fisher target"):
        fisher_scores(model, b, fwd, target="hessian")
    with pytest.raises(ValueError, match="draws"):
        fisher_scores(model, b, fwd, draws=0)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        fisher_scores(model, b, lambda m, x: m(x).sum(1))
    with pytest.raises(ValueError, match="no batches"):
        fisher_scores(model, [], fwd)


def test_large_cpu_blocks_take_the_per_example_path_and_are_exact():
    # blocks of >= _CPU_PER_EXAMPLE_MIN elements use the one-example-at-a-time CPU path of sq_outer_sum, in blocks
    # of output rows (here 1100 rows: two full blocks and a partial one)
    from talos.fisher import _CPU_PER_EXAMPLE_MIN, _CPU_ROW_BLOCK

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1100), nn.GELU(), nn.Linear(1100, 7))
    assert 256 * 1100 >= _CPU_PER_EXAMPLE_MIN and 2 < 1100 / (_CPU_ROW_BLOCK // 256) < 3
    x = torch.randn(6, 5, 256)  # 5 positions per example

    def fwd(m, b):
        return m(b).mean(1)

    ref = fisher_scores_reference(model, [x], fwd, generator=torch.Generator().manual_seed(1))
    fast = fisher_scores(model, [x], fwd, generator=torch.Generator().manual_seed(1))
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("model_kind", ["toy", "open_clip"])
def test_exact_and_fast_under_non_reentrant_activation_checkpointing(model_kind, caplog):
    # the backward re-runs checkpointed forwards: the observable MHA forward must still be installed then
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    if model_kind == "toy":

        class Ckpt(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = ToyViT()
                self.grad_checkpointing = False

            def forward(self, x):
                if self.grad_checkpointing:
                    return checkpoint(self.inner, x, use_reentrant=False)
                return self.inner(x)

        model, batches = Ckpt(), image_batches(2, 5)
    else:
        from open_clip.transformer import VisionTransformer

        model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                  output_dim=6)
        batches = [torch.randn(4, 3, 32, 32)]
    direct = ("pos", "class_embedding", "positional_embedding", "proj")  # scored by the fallback by design
    names = [n for n, _ in model.named_parameters() if n.split(".")[-1] not in direct]
    ref = fisher_scores(model, batches, fwd, params=names, generator=torch.Generator().manual_seed(3))
    if model_kind == "open_clip":
        model.set_grad_checkpointing(True)
    else:
        model.grad_checkpointing = True
    with caplog.at_level(logging.WARNING, logger="talos"):
        got = fisher_scores(model, batches, fwd, params=names, generator=torch.Generator().manual_seed(3))
    assert "fallback" not in caplog.text
    assert_close_scores(got, ref, rtol=1e-5)


def test_fisher_scorer_passes_split_over_ranks_sum_to_one_pass():
    """The public scorer behind calibration: per-batch generators, owned batches and float64 totals."""
    from talos.fisher import FisherScorer

    torch.manual_seed(0)
    model, batches = ToyViT(), image_batches(3, 4)
    names = [n for n, _ in model.named_parameters()]
    scorer = FisherScorer(model, target="log_prob", draws=2)
    gen_of = lambda b: torch.Generator().manual_seed(100 + b)  # noqa: E731
    with scorer.scoring():
        assert not model.training
        totals = scorer.zeros(torch.float64)
        for rank in (0, 1):  # two "ranks", each scoring every other batch into the same totals
            _, n = scorer.score(batches, fwd, batch_generator=gen_of, owns=lambda b, r=rank: b % 2 == r,
                                totals=totals)
            assert n == (2 if rank == 0 else 1)
    assert model.training  # restored
    # independent reference: each batch brute-forced alone with its own seed, summed
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for b, batch in enumerate(batches):
        one = brute_force(model, [batch], fwd, names, "log_prob", 2, seed=100 + b)
        for n in ref:
            ref[n] += one[n].double()
    assert_close_scores({n: t.float() for n, t in totals.items()}, {n: t.float() for n, t in ref.items()})


def _staircase(O: int, I: int, density: float, seed: int) -> torch.Tensor:
    """A kept-entries mask like calibration's: the entries whose rank-1 'score' row_o * col_j is lowest."""
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(O, 1, generator=g) * torch.rand(1, I, generator=g)
    return score <= score.flatten().kthvalue(max(1, int(density * O * I))).values


@pytest.mark.parametrize("T", [1, 5])
def test_sq_outer_sum_computes_exactly_the_needed_entries(T, monkeypatch):
    import talos.fisher as fisher
    from talos.fisher import _Workspace, sq_outer_sum

    monkeypatch.setattr(fisher, "_NEED_BLOCK", 2**13)  # blocks of ~32 rows on these small matrices
    torch.manual_seed(0)
    g, a = torch.randn(6, T, 300), torch.randn(6, T, 260)
    ref = torch.einsum("bto,bti->boi", g, a).square().sum(0)  # independent: per-example grads, squared, summed
    need = _staircase(300, 260, 0.1, seed=1)
    ws = _Workspace(2**21)
    assert ws.need_blocks(need) is not None  # the blocked path, not the whole matrix
    got = sq_outer_sum(g, a, ws, need)
    torch.testing.assert_close(got[need], ref[need], rtol=1e-5, atol=0)
    if T > 1:
        assert torch.count_nonzero(got[~need]) < 0.5 * (~need).sum()  # most entries not needed were skipped
    else:  # one position: the whole matrix is one matmul, cheaper than blocks, so every entry is computed
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(sq_outer_sum(g, a, ws), ref, rtol=1e-5, atol=0)  # no mask: every entry


def test_scorer_needed_entries_match_the_full_pass_and_dead_layers_are_skipped(monkeypatch):
    """FisherScorer.score(needed=...): the needed entries equal the full pass's; a layer with nothing needed runs
    no rule at all, and the blocked path is taken for mostly-dead weights."""
    import talos.fisher as fisher

    monkeypatch.setattr(fisher, "_NEED_BLOCK", 2**13)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 320), nn.GELU(), nn.Linear(320, 288), nn.GELU(), nn.Linear(288, 7))
    x = torch.randn(6, 5, 256)

    def fwd(m, b):
        return m(b).mean(1)

    scorer = fisher.FisherScorer(model)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with scorer.scoring():
        full, _ = scorer.score([x], fwd, generator=gen())
    needed = {"0.weight": _staircase(320, 256, 0.1, seed=2), "2.weight": torch.zeros(288, 320, dtype=torch.bool),
              "2.bias": torch.zeros(288, dtype=torch.bool)}
    calls = {"blocked": 0, "rules": 0}
    blocked, outer = fisher._sq_outer_sum_needed, fisher.sq_outer_sum

    def count(key, fn):
        def wrapped(*args, **kw):
            calls[key] += 1
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(fisher, "_sq_outer_sum_needed", count("blocked", blocked))
    monkeypatch.setattr(fisher, "sq_outer_sum", count("rules", outer))  # called once per linear rule
    scorer = fisher.FisherScorer(model)
    with scorer.scoring():
        part, _ = scorer.score([x], fwd, generator=gen(), needed=needed)
    assert calls == {"blocked": 1, "rules": 2}  # layer 2 (nothing needed) skipped; layer 0 blocked
    for n, v in full.items():
        m = needed.get(n, torch.ones_like(v, dtype=torch.bool))
        torch.testing.assert_close(part[n][m], v[m], rtol=1e-5, atol=0)
    assert torch.count_nonzero(part["2.weight"]) == 0


def test_positions_no_example_reads_are_dropped_and_scores_stay_exact(monkeypatch):
    """A next-token score reads one position: the head's per-example products run over that position only."""
    import talos.fisher as fisher

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 9))
    x = torch.randn(5, 7, 12)

    def last(m, b):
        return m(b)[:, -1]  # [B, 9] from position 6 of 7

    seen = []
    dense = fisher._sq_outer_sum_dense
    monkeypatch.setattr(fisher, "_sq_outer_sum_dense", lambda g, a, ws: seen.append(g.shape[1]) or dense(g, a, ws))
    ref = fisher_scores_reference(model, [x], last, generator=torch.Generator().manual_seed(2))
    fast = fisher_scores(model, [x], last, generator=torch.Generator().manual_seed(2))
    assert seen == [1, 1]  # both layers: only position 6 carries gradient
    assert_close_scores(fast, ref, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_run_inside_the_backward_asked_for_the_lowest_layers_only(case, monkeypatch):
    # large captures (forced here): the backward returns only the lowest layers' output gradients, every layer's
    # rule runs in a hook as its gradient forms; exact for 2 draws (the graph is kept for the second, then freed)
    import talos.fisher as TF

    monkeypatch.setattr(TF, "_HOLD_GRADS_BELOW", 0)
    asked = []
    real = TF._lowest

    def spy(caps):
        low = real(caps)
        asked.append((len(caps), len(low)))
        return low

    monkeypatch.setattr(TF, "_lowest", spy)
    torch.manual_seed(0)
    cls, data = CASES[case]
    model, batches = cls(), data()
    names = [n for n, _ in model.named_parameters()]
    fast = fisher_scores(model, batches, fwd, target="log_prob", draws=2, generator=torch.Generator().manual_seed(3))
    assert_close_scores(fast, brute_force(model, batches, fwd, names, "log_prob", 2, seed=3))
    assert asked and all(1 <= low < n for n, low in asked)
