"""Baseline modes in isolation: linearized model, LoRA / L-LoRA algebra, LoTA and ablation masks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from talos.linearize import LinearizedModel
from talos.lora_layers import LoRAAdapters
from talos.modes import MODES, ModeContext, SparseSettings, get_mode, global_lowest
from talos.modes.lora import LoRASettings
from talos.task_vector import TaskVector

from .conftest import ToyViT, image_batches


def test_linearized_model_is_first_order_taylor():
    torch.manual_seed(0)
    model = ToyViT().eval()
    names = [n for n, _ in model.named_parameters()]
    lin = LinearizedModel(model, names)
    x = image_batches(1, 3)[0]
    with torch.no_grad():
        torch.testing.assert_close(lin(x), model(x), rtol=0, atol=1e-6)  # at θ = θ0
    named = dict(model.named_parameters())
    delta = {n: torch.randn_like(p) for n, p in named.items()}
    # f_lin(θ0 + εδ) = f(θ0) + ε J δ: compare with central finite differences of f
    eps = 1e-3
    with torch.no_grad():
        f0 = model(x)
        for n in names:
            named[n].add_(eps * delta[n])
        f_plus, lin_plus = model(x), lin(x)
        for n in names:
            named[n].sub_(2 * eps * delta[n])
        f_minus = model(x)
        for n in names:
            named[n].add_(eps * delta[n])
    jvp_fd = (f_plus - f_minus) / 2
    torch.testing.assert_close(lin_plus - f0, jvp_fd, rtol=1e-2, atol=1e-4)
    # and it is exactly linear in θ − θ0
    with torch.no_grad():
        for n in names:
            named[n].add_(2 * eps * delta[n])
        lin2 = lin(x)
        for n in names:
            named[n].sub_(2 * eps * delta[n])
    torch.testing.assert_close(lin2 - f0, 2 * (lin_plus - f0), rtol=1e-4, atol=1e-6)


def _cleanup_leaves_the_base_untouched(state, model, before):
    state.cleanup()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in after.items())


@torch.no_grad()
def _add_and_run(model, tv, x):
    """Add τ to the model's parameters (in place) and return its output on ``x``."""
    named = dict(model.named_parameters())
    for n in tv.keys():
        named[n].add_(tv[n])
    return model(x)


def _mha_targets(model):
    E = model.attn.embed_dim
    return {"attn.in_proj_weight": [slice(0, E), slice(2 * E, 3 * E)], "mlp.0.weight": None}


def test_lora_is_a_noop_at_init_and_trains_only_adapters():
    torch.manual_seed(0)
    model = ToyViT()
    x = image_batches(1, 3)[0]
    ref = model(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = ModeContext(model, [n for n, _ in model.named_parameters()], lora_targets=_mha_targets,
                      settings=LoRASettings(lora_rank=2))
    state = get_mode("lora").prepare(ctx, None)
    torch.testing.assert_close(state.model(x), ref, rtol=0, atol=0)  # B = 0: exactly the base model
    assert all("lora" in n for n, _ in state.named_params)
    owned = {id(p) for p in model.parameters()}  # the model owns the adapters: DDP all-reduces their gradients
    assert all(id(p) in owned for _, p in state.named_params)
    with pytest.raises(ValueError, match="attached once"):
        LoRAAdapters(ToyViT(), _mha_targets(model)).attach(model)
    frozen = [p for n, p in model.named_parameters() if "slots" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    opt = torch.optim.SGD([p for _, p in state.named_params], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(state.model(x), torch.tensor([0, 1, 2])).backward()
        opt.step()
    tv = state.task_vector()
    assert set(tv.keys()) == {"attn.in_proj_weight", "mlp.0.weight"}
    E = model.attn.embed_dim
    assert not tv["attn.in_proj_weight"][E:2 * E].any() and tv["attn.in_proj_weight"][:E].any()
    out_lora = state.model(x).detach()
    _cleanup_leaves_the_base_untouched(state, model, before)
    torch.testing.assert_close(_add_and_run(model, tv, x), out_lora, rtol=1e-5, atol=1e-6)  # merged = adapted


def _llora(model, rank=2, alpha=4.0, seed=3):
    ctx = ModeContext(model, [], lora_targets=_mha_targets, seed=seed,
                      settings=LoRASettings(lora_rank=rank, lora_alpha=alpha, lora_scaling="alpha"))
    return get_mode("llora").prepare(ctx, None)


def _xavier_a0(shapes, rank, seed):
    """The official A0 of each (in_features) in draw order: nn.Linear(E, r) weight, xavier_uniform_, times 1/sqrt(r),
    transcribed with the bound written out (gain 1: sqrt(6 / (fan_in + fan_out)))."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for inp in shapes:
        bound = (6.0 / (inp + rank)) ** 0.5
        std_dev = 1 / torch.sqrt(torch.tensor(rank).float())  # as the official code writes it
        out.append(torch.empty(rank, inp).uniform_(-bound, bound, generator=g).mul_(std_dev))
    return out


def test_llora_a_init_is_the_official_xavier_draw():
    torch.manual_seed(0)
    model = ToyViT()
    E = model.attn.embed_dim
    state = _llora(model, rank=3, seed=7)
    a_params = [p for n, p in state.named_params if ".A." in n]
    b_params = [p for n, p in state.named_params if ".B." in n]
    # draw order: in_proj q rows, in_proj v rows (in E), then mlp.0 (in E)
    ref = _xavier_a0([E, E, E], rank=3, seed=7)
    assert len(a_params) == 3
    for a, r in zip(a_params, ref):
        assert a.shape == (3, E)
        torch.testing.assert_close(a.detach(), r, rtol=0, atol=0)
    assert all(not b.any() for b in b_params)  # B0 = 0
    # the measurement: E = 64, r = 16 -> max |A0| <= sqrt(6/80)/4 = 0.0685 (kaiming would reach 0.125)
    big = LoRAAdapters(nn.Linear(64, 64), {"weight": None}, rank=16, init="xavier", seed=0)
    a0 = next(p for n, p in big.named_parameters() if ".A." in n).detach()
    assert 0.06 < a0.abs().max() <= (6 / 80) ** 0.5 / 4
    state.cleanup()
    # peft's draw (the official nlp L-LoRA keeps peft's init) on request: uniform within 1/sqrt(E)
    ctx = ModeContext(model, [], lora_targets=_mha_targets, seed=7,
                      settings=LoRASettings(lora_rank=3, lora_init="kaiming"))
    state = get_mode("llora").prepare(ctx, None)
    a = next(p for n, p in state.named_params if ".A." in n).detach()
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(a, (torch.rand(3, E, generator=g) * 2 - 1) / E ** 0.5, rtol=0, atol=0)
    state.cleanup()
    with pytest.raises(ValueError, match="init"):
        get_mode("llora").prepare(ModeContext(model, [], lora_targets=_mha_targets,
                                              settings=LoRASettings(lora_init="normal")), None)


def test_llora_update_is_scale_b_a0_and_ignores_a():
    torch.manual_seed(0)
    model = ToyViT().eval()
    E = model.attn.embed_dim
    state = _llora(model, rank=2, alpha=4.0, seed=3)
    assert not get_mode("llora").eval_linearized  # evaluated through the ordinary, non-linear model
    a0 = _xavier_a0([E, E, E], rank=2, seed=3)
    a_params = [p for n, p in state.named_params if ".A." in n]
    b_params = [p for n, p in state.named_params if ".B." in n]
    g = torch.Generator().manual_seed(5)
    bs = [torch.randn(p.shape, generator=g) for p in b_params]
    with torch.no_grad():
        for p, b in zip(b_params, bs):
            p.copy_(b)
        for p in a_params:  # moving A changes nothing to first order around B0 = 0
            p.add_(torch.randn(p.shape, generator=g))
    tv = state.task_vector()
    # hand-computed: alpha * B @ A0 on the q rows and the v rows, zero on the k rows; all rows of mlp.0
    q, v, m = (4.0 * b @ a for b, a in zip(bs, a0))
    expect_in = torch.cat([q, torch.zeros(E, E), v])
    torch.testing.assert_close(tv["attn.in_proj_weight"], expect_in, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tv["mlp.0.weight"], m, rtol=1e-6, atol=1e-7)
    # and as the official code computes it: the first-order expansion (torch.func.jvp) of the branch
    # x -> alpha * B(A(x)) around (A0, B0 = 0), applied to inputs, equals x @ ΔW.T
    x = torch.randn(5, E, generator=g)
    branch = lambda a, b: 4.0 * (x @ a.T @ b.T)  # noqa: E731
    a_now = a_params[2].detach()
    out, dout = torch.func.jvp(branch, (a0[2], torch.zeros_like(bs[2])), (a_now - a0[2], bs[2]))
    torch.testing.assert_close(out + dout, x @ tv["mlp.0.weight"].T, rtol=1e-5, atol=1e-6)
    state.cleanup()


def test_llora_network_stays_nonlinear_and_tau_reproduces_it():
    torch.manual_seed(0)
    model = ToyViT().eval()
    x = image_batches(1, 4)[0]
    with torch.no_grad():
        f0 = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _llora(model)
    b_params = [p for n, p in state.named_params if ".B." in n]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b_params:
            p.copy_(torch.randn(p.shape, generator=g))
        f_adapted = state.model(x)
    tv = state.task_vector()
    _cleanup_leaves_the_base_untouched(state, model, before)
    f1 = _add_and_run(model, tv, x)  # θ0 + τ in the ordinary model = the adapted model
    f2 = _add_and_run(model, tv, x)  # θ0 + 2τ
    torch.testing.assert_close(f1, f_adapted, rtol=1e-5, atol=1e-6)
    # not the linear extrapolation f0 + 2 (f1 - f0): only the adapter branch is linear, not the network
    assert (f2 - (f0 + 2 * (f1 - f0))).abs().max() > 1e-2 * (f1 - f0).abs().max()


def test_lota_and_ablation_masks():
    torch.manual_seed(0)
    model = ToyViT()
    eligible = [n for n, _ in model.named_parameters() if n != "pos"]
    named = dict(model.named_parameters())
    tau = TaskVector({n: torch.randn_like(named[n]) for n in eligible})
    ctx = ModeContext(model, eligible, settings=SparseSettings(sparsity=0.8), load_task_vector=lambda m: tau)
    N = sum(named[n].numel() for n in eligible)
    for name in ("lota", "random_mask", "magnitude_mask"):
        masks = get_mode(name).masks(ctx)
        assert sum(int(m.sum()) for m in masks.values()) == int(0.2 * N + 1e-6)
    lota = get_mode("lota").masks(ctx)
    kept = torch.cat([tau[n].abs()[lota[n]] for n in eligible])
    dropped = torch.cat([tau[n].abs()[~lota[n]] for n in eligible])
    assert kept.min() >= dropped.max()  # the largest |τ| are trainable
    mag = get_mode("magnitude_mask").masks(ctx)
    kept = torch.cat([named[n].detach().abs()[mag[n]] for n in eligible])
    dropped = torch.cat([named[n].detach().abs()[~mag[n]] for n in eligible])
    assert kept.max() <= dropped.min()
    r1, r2 = get_mode("random_mask").masks(ctx), get_mode("random_mask").masks(ctx)
    assert all(torch.equal(r1[n], r2[n]) for n in eligible)  # seeded


def test_global_lowest_exact_count_with_ties():
    m = global_lowest({"a": torch.zeros(5), "b": torch.zeros(5)}, 0.3)
    assert m["a"].tolist() == [True, True, True, False, False] and not m["b"].any()


def test_lota_without_standard_vector_raises():
    model = ToyViT()
    with pytest.raises(ValueError, match="load_task_vector"):
        get_mode("lota").masks(ModeContext(model, ["head.weight"]))


def test_lora_bad_settings_raise():
    model = ToyViT()
    with pytest.raises(ValueError, match="rank"):
        LoRAAdapters(model, {"mlp.0.weight": None}, rank=0)
    with pytest.raises(ValueError, match="scaling"):
        LoRAAdapters(model, {"mlp.0.weight": None}, scaling="weird")
    with pytest.raises(ValueError, match="2-D"):
        LoRAAdapters(model, {"mlp.0.bias": None})


def test_every_mode_is_exercised_here_or_in_the_cli_test():
    assert set(MODES.names()) == {"standard", "talos", "linear", "posthoc", "lora", "llora", "lota",
                                  "random_mask", "magnitude_mask", "imported"}  # imported: test_import_checkpoints
