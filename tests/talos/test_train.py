"""The shared training loop: masked entries frozen, clip-then-mask order, accumulation, exact resume."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from talos.modes import MODES, ModeContext, get_mode
from talos.train import TrainConfig, lr_factor, setup_trainable, train

from .conftest import ToyViT, image_batches


class Data(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def random_masks(model, names, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    return {n: torch.rand(named[n].shape, generator=g) < density for n in names}


def run(tmp_path=None, stop_after=None, masks=True, accumulation=1, steps=6):
    torch.manual_seed(0)
    model = ToyViT()
    eligible = [n for n, _ in model.named_parameters() if n not in ("pos", "head.weight", "head.bias")]
    m = random_masks(model, eligible) if masks else None
    m and m.update({"mlp.0.bias": torch.zeros(32, dtype=torch.bool)})  # one fully frozen tensor
    named = setup_trainable(model, eligible, m, dense=["pos"])
    cfg = TrainConfig(steps=steps, batch_size=8, accumulation=accumulation, lr=1e-2, weight_decay=0.1, warmup=2,
                      checkpoint_every=100)
    ck = None if tmp_path is None else tmp_path / "ck.pt"
    out = train(model, Data(), loss_fn, named, m, cfg, dense=["pos"], checkpoint_path=ck, stop_after=stop_after,
                progress=False)
    return model, m, out


def test_masked_entries_frozen_and_fully_frozen_tensors_skip_autograd():
    torch.manual_seed(0)
    start = ToyViT().state_dict()
    model, masks, out = run()
    assert out["steps"] == 6
    sd = model.state_dict()
    for n, m in masks.items():
        assert torch.equal(sd[n][~m], start[n][~m]), n  # bitwise frozen, weight decay included
        if m.any():
            assert not torch.equal(sd[n][m], start[n][m]), n
    assert not model.mlp[0].bias.requires_grad
    assert torch.equal(sd["head.weight"], start["head.weight"])  # not eligible, not dense
    assert not torch.equal(sd["pos"], start["pos"])  # dense extra trains


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    full, _, _ = run()
    part, _, out = run(tmp_path, stop_after=3)
    assert out["interrupted"] and (tmp_path / "ck.pt").exists()
    resumed, _, out2 = run(tmp_path)
    assert out2["steps"] == 6
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_accumulation_matches_full_batch():
    a, _, _ = run(masks=False, accumulation=1, steps=3)
    b, _, _ = run(masks=False, accumulation=4, steps=3)
    sa, sb = a.state_dict(), b.state_dict()
    # the key bias has an exactly-zero true gradient (softmax ignores a constant per query), so Adam turns
    # float noise there into full-size steps; compare it out of the check
    for sd in (sa, sb):
        sd["attn.in_proj_bias"] = torch.cat([sd["attn.in_proj_bias"][:16], sd["attn.in_proj_bias"][32:]])
    for k, v in sa.items():
        torch.testing.assert_close(v, sb[k], rtol=1e-4, atol=1e-6)


def test_lr_schedule():
    assert lr_factor(0, 4, 10, "cosine") == 0.25 and lr_factor(3, 4, 10, "cosine") == 1.0
    assert lr_factor(4, 4, 10, "cosine") == 1.0 and lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 4, 10, "constant") == 1.0


@pytest.mark.parametrize("bad", [dict(epochs=None, steps=None), dict(steps=2, batch_size=10, accumulation=3),
                                 dict(steps=2, schedule="linear"), dict(steps=2, precision="fp8"),
                                 dict(steps=2, lr=0.0)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad).validate()


def test_mode_registry():
    assert {"standard", "talos"} <= set(MODES.names())
    with pytest.raises(ValueError, match="valid choices"):
        get_mode("nonsense")
    torch.manual_seed(0)
    model = ToyViT()
    eligible = [n for n, _ in model.named_parameters() if n != "pos"]
    ctx = ModeContext(model, eligible, forward_fn=lambda m, b: m(b),
                      calibration_batches=lambda: image_batches(1, 4), progress=False)
    assert get_mode("standard").masks(ctx) is None
    masks = get_mode("talos").masks(ctx)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept - int(0.1 * total)) <= 1


def test_ddp_refuses_trained_tensors_the_model_does_not_own(monkeypatch):
    from talos import train as train_module

    model, stray = nn.Linear(2, 2), nn.Parameter(torch.zeros(2))
    monkeypatch.setattr(train_module.dist, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="1 trained tensor.*not parameters of the model.*: stray"):
        train_module._wrap_ddp(model, torch.device("cpu"), [("weight", model.weight), ("stray", stray)])
