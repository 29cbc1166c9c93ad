"""Tests for talos.optim: MaskedAdamW exactness, masking guarantees, checkpointing and memory."""
from __future__ import annotations

import pytest
import torch

from talos.optim import MaskedAdamW, freeze_masked_out, masked_state_bytes

SHAPES = {"a.weight": (17, 9), "a.bias": (17,), "b.weight": (4, 3, 5), "c": (33,)}


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for n, s in SHAPES.items()
    }


def random_masks(params: dict, density: float = 0.1, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in params.items()}
    for m in masks.values():  # make sure every tensor is partially masked
        m.view(-1)[0] = True
        m.view(-1)[-1] = False
    return masks


def set_random_grads(params: dict, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def run(opt: torch.optim.Optimizer, params: dict, steps: range, sched=None) -> None:
    for t in steps:
        set_random_grads(params, t)
        opt.step()
        if sched is not None:
            sched.step()


def clone_params(params: dict) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def reference_masked_adamw(params: dict, masks: dict, steps: range, lr, betas, eps, wd) -> dict:
    """Textbook dense AdamW (same dtype) whose moments and update are kept only where mask is True."""
    out = {n: p.detach().clone() for n, p in params.items()}
    m = {n: torch.zeros_like(x) for n, x in out.items()}
    v = {n: torch.zeros_like(x) for n, x in out.items()}
    b1, b2 = betas
    for k, t in enumerate(steps, start=1):
        set_random_grads(params, t)
        for n, x in out.items():
            g = params[n].grad
            keep = masks[n]
            m[n] = torch.where(keep, b1 * m[n] + (1 - b1) * g, m[n])
            v[n] = torch.where(keep, b2 * v[n] + (1 - b2) * g * g, v[n])
            new = x * (1 - lr * wd)
            denom = v[n].sqrt() / (1 - b2**k) ** 0.5 + eps
            new = new - lr / (1 - b1**k) * m[n] / denom
            out[n] = torch.where(keep, new, x)
    return out


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_frozen_entries_bitwise_unchanged(layout):
    params = make_params()
    masks = random_masks(params)
    start = clone_params(params)
    opt = MaskedAdamW(params.items(), masks, lr=1e-2, weight_decay=0.1, state_layout=layout)
    run(opt, params, range(50))
    for n, p in params.items():
        frozen = ~masks[n]
        assert torch.equal(p.detach()[frozen], start[n][frozen]), n
        assert not torch.equal(p.detach()[masks[n]], start[n][masks[n]]), n


def test_all_true_masks_match_torch_adamw():
    params, ref_params = make_params(), make_params()
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in params.items()}
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)
    opt = MaskedAdamW(params.items(), masks, **kw)
    ref = torch.optim.AdamW(ref_params.values(), foreach=False, **kw)
    run(opt, params, range(50))
    run(ref, ref_params, range(50))
    assert set(opt.layouts().values()) == {"dense"}
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=0, atol=1e-6)


def test_dense_names_match_torch_adamw_without_masks():
    params, ref_params = make_params(), make_params()
    opt = MaskedAdamW(params.items(), {}, lr=1e-2, weight_decay=0.1, dense=list(params))
    ref = torch.optim.AdamW(ref_params.values(), lr=1e-2, weight_decay=0.1, foreach=False)
    run(opt, params, range(20))
    run(ref, ref_params, range(20))
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_masked_update_matches_reference(layout):
    params = make_params()
    masks = random_masks(params, density=0.3)
    kw = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    expected = reference_masked_adamw(params, masks, range(30), kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"])
    params = make_params()  # the reference only read grads; restart from the same values
    opt = MaskedAdamW(params.items(), masks, **kw, state_layout=layout)
    run(opt, params, range(30))
    want_kind = "compact" if layout == "compact" else "masked"
    assert set(opt.layouts().values()) == {want_kind}
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-6)
    if layout == "compact":
        for n, p in params.items():
            assert opt.state[p]["exp_avg"].shape == (int(masks[n].sum()),)


def test_compact_and_dense_layouts_agree_bitwise():
    results = {}
    for layout in ("compact", "dense"):
        params = make_params()
        opt = MaskedAdamW(params.items(), random_masks(params), lr=1e-2, weight_decay=0.1, state_layout=layout)
        run(opt, params, range(10))
        results[layout] = clone_params(params)
    for n in SHAPES:
        assert torch.equal(results["compact"][n], results["dense"][n]), n


def test_auto_layout_picks_smaller_state():
    params = make_params()
    masks = random_masks(params, density=0.1)
    masks["c"] = torch.ones(33, dtype=torch.bool)
    masks["c"][:3] = False  # ~90% dense: full moments + bool mask are smaller than compact
    opt = MaskedAdamW(params.items(), masks, lr=1e-3)
    kinds = opt.layouts()
    assert kinds["c"] == "masked"
    assert kinds["a.weight"] == "compact"


def test_all_false_tensor_has_no_state_and_is_frozen():
    params = make_params()
    masks = random_masks(params)
    masks["b.weight"] = torch.zeros(SHAPES["b.weight"], dtype=torch.bool)
    start = clone_params(params)
    opt = MaskedAdamW(params.items(), masks, lr=1e-2, weight_decay=0.1)
    run(opt, params, range(5))  # b.weight has a .grad every step
    assert opt.layouts()["b.weight"] == "skip"
    assert len(opt.state[params["b.weight"]]) == 0
    assert torch.equal(params["b.weight"].detach(), start["b.weight"])

    frozen = freeze_masked_out(params.items(), masks)
    assert frozen == ["b.weight"]
    assert not params["b.weight"].requires_grad
    assert all(p.requires_grad for n, p in params.items() if n != "b.weight")


def test_freeze_masked_out_accepts_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    masks = {"0.weight": torch.zeros(4, 3, dtype=torch.bool), "1.weight": torch.ones(2, 4, dtype=torch.bool)}
    assert freeze_masked_out(model, masks) == ["0.weight"]
    x = torch.randn(5, 3)
    model(x).sum().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    with pytest.raises(ValueError, match="nope"):
        freeze_masked_out(model, {"nope": torch.zeros(1, dtype=torch.bool)})


def test_validation_errors():
    params = make_params()
    masks = random_masks(params)
    missing = {n: m for n, m in masks.items() if n != "c"}
    with pytest.raises(ValueError, match="'c'"):
        MaskedAdamW(params.items(), missing, lr=1e-3)
    MaskedAdamW(params.items(), missing, lr=1e-3, dense=["c"])  # explicitly dense is fine

    bad_shape = dict(masks, c=torch.ones(32, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        MaskedAdamW(params.items(), bad_shape, lr=1e-3)
    bad_dtype = dict(masks, c=torch.ones(33))
    with pytest.raises(ValueError, match="bool"):
        MaskedAdamW(params.items(), bad_dtype, lr=1e-3)
    typo = dict(masks, **{"a.wieght": torch.ones(17, 9, dtype=torch.bool)})
    with pytest.raises(ValueError, match="a.wieght"):
        MaskedAdamW(params.items(), typo, lr=1e-3)
    with pytest.raises(ValueError, match="dense"):
        MaskedAdamW(params.items(), masks, lr=1e-3, dense=["c"])
    with pytest.raises(ValueError, match="named"):
        MaskedAdamW(list(params.values()), masks, lr=1e-3)


def test_lambda_lr_schedule_is_honoured():
    params = make_params()
    masks = random_masks(params, density=0.5)
    start = clone_params(params)
    opt = MaskedAdamW(params.items(), masks, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 3 else 0.0)
    run(opt, params, range(3), sched)
    after3 = clone_params(params)
    assert any(not torch.equal(after3[n], start[n]) for n in params)
    assert opt.param_groups[0]["lr"] == 0.0
    run(opt, params, range(3, 8), sched)  # lr 0: neither Adam nor weight decay moves anything
    for n in params:
        assert torch.equal(params[n].detach(), after3[n]), n

    # And a halved lr gives a different trajectory than a constant one.
    runs = []
    for factor in (1.0, 0.5):
        ps = make_params()
        o = MaskedAdamW(ps.items(), masks, lr=1e-2)
        s = torch.optim.lr_scheduler.LambdaLR(o, lambda k, f=factor: f)
        run(o, ps, range(3), s)
        runs.append(clone_params(ps))
    assert not torch.equal(runs[0]["c"], runs[1]["c"])


def test_state_dict_resume_is_bitwise_identical():
    kw = dict(lr=1e-2, weight_decay=0.1)
    masks = random_masks(make_params())
    masks["b.weight"] = torch.zeros(SHAPES["b.weight"], dtype=torch.bool)
    masks["c"] = torch.ones(33, dtype=torch.bool)

    ref = make_params()
    opt = MaskedAdamW(ref.items(), masks, **kw)
    run(opt, ref, range(10))

    params = make_params()
    opt = MaskedAdamW(params.items(), masks, **kw)
    run(opt, params, range(5))
    saved = opt.state_dict()
    buf = __import__("io").BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    params2 = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt2 = MaskedAdamW(params2.items(), masks, **kw)
    opt2.load_state_dict(torch.load(buf))
    run(opt2, params2, range(5, 10))
    for n in params2:
        assert torch.equal(params2[n].detach(), ref[n].detach()), n

    # State saved under other masks is rejected rather than silently misapplied.
    other = random_masks(make_params(), seed=7)
    opt3 = MaskedAdamW(make_params().items(), other, **kw)
    with pytest.raises(ValueError, match="masks"):
        opt3.load_state_dict(saved)


def test_state_smaller_than_dense_adamw_at_10_percent():
    torch.manual_seed(0)
    params = {"w": torch.nn.Parameter(torch.randn(256, 256)), "b": torch.nn.Parameter(torch.randn(256))}
    masks = {n: torch.rand(p.shape) < 0.1 for n, p in params.items()}
    dense_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opt = MaskedAdamW(params.items(), masks, lr=1e-3)
    ref = torch.optim.AdamW(dense_params.values(), lr=1e-3)
    run(opt, params, range(1))
    run(ref, dense_params, range(1))
    masked, dense = masked_state_bytes(opt), masked_state_bytes(ref)
    # compact: 2 fp32 moments + 1 int64 index per trainable entry = 16 B vs 8 B per entry
    assert masked < 0.25 * dense, (masked, dense)


def test_params_without_grad_are_skipped():
    params = make_params()
    masks = random_masks(params)
    start = clone_params(params)
    opt = MaskedAdamW(params.items(), masks, lr=1e-2, weight_decay=0.1)
    set_random_grads(params, 0)
    params["a.bias"].grad = None
    opt.step()
    assert torch.equal(params["a.bias"].detach(), start["a.bias"])
    assert len(opt.state[params["a.bias"]]) == 0
    opt.zero_grad()
    assert all(p.grad is None for p in params.values())


def test_deepcopy_keeps_masks():
    import copy

    model = torch.nn.Linear(6, 5)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) < 0.3 for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), masks, lr=1e-2, weight_decay=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    start = model2.weight.detach().clone()
    model2(torch.randn(4, 6)).sum().backward()
    opt2.step()
    frozen = ~masks["weight"]
    assert torch.equal(model2.weight.detach()[frozen], start[frozen])
    assert not torch.equal(model2.weight.detach(), start)
    assert torch.equal(model.weight.detach(), start)  # the original is untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_masks_on_cuda_params():
    cpu, gpu = make_params(), {n: torch.nn.Parameter(p.detach().cuda()) for n, p in make_params().items()}
    masks = random_masks(cpu)
    opts = [MaskedAdamW(ps.items(), masks, lr=1e-2, weight_decay=0.1) for ps in (cpu, gpu)]
    for t in range(5):
        set_random_grads(cpu, t)
        for n in gpu:
            gpu[n].grad = cpu[n].grad.cuda()
        for o in opts:
            o.step()
    for n in cpu:
        torch.testing.assert_close(gpu[n].detach().cpu(), cpu[n].detach(), rtol=0, atol=1e-6)
