"""torchrun-style multi-process runs on CPU (gloo, 2 processes): same masks, same weights, one artifact copy."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import join_env, spawn_ranks

pytestmark = pytest.mark.distributed


def _toy():
    from tests.talos.conftest import ToyViT

    torch.manual_seed(0)
    return ToyViT()


def _data():
    from tests.talos.conftest import image_batches

    return image_batches(4, 6)


def _calibrate(out_dir):
    from talos import calibrate_masks

    model = _toy()
    return calibrate_masks(model, _data(), lambda m, b: m(b), sparsity=0.9, progress=False,
                           generator=torch.Generator().manual_seed(0))


def _calibrate_worker(rank, world, port, out_dir):
    from talos import distributed as dist

    join_env(rank, world, port)
    dist.init_from_env("cpu")
    masks = _calibrate(out_dir)
    torch.save(masks, os.path.join(out_dir, f"masks{rank}.pt"))


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _train(mode_name, ckpt=None):
    from talos.modes import ModeContext, get_mode
    from talos.train import TrainConfig, train

    model = _toy()
    eligible = [n for n, _ in model.named_parameters() if n != "pos"]
    ctx = ModeContext(model, eligible, dense=["pos"], forward_fn=lambda m, b: m(b),
                      calibration_batches=_data, progress=False,
                      lora_targets=lambda m: {"attn.in_proj_weight": [slice(0, 16), slice(32, 48)]})  # q and v
    mode = get_mode(mode_name)
    state = mode.prepare(ctx, mode.masks(ctx))
    cfg = TrainConfig(steps=4, batch_size=16, accumulation=2, lr=1e-2, weight_decay=0.1, warmup=1,
                      checkpoint_every=2)
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    train(state.model, _Data(), loss, state.named_params, state.masks, cfg, dense=state.dense,
          checkpoint_path=ckpt, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_worker(rank, world, port, out_dir, mode_name):
    from talos import distributed as dist

    join_env(rank, world, port)
    dist.init_from_env("cpu")
    sd = _train(mode_name, ckpt=os.path.join(out_dir, "ckpt.pt"))
    torch.save(sd, os.path.join(out_dir, f"{mode_name}{rank}.pt"))


def test_distributed_calibration_gives_single_process_masks(tmp_path):
    single = _calibrate(str(tmp_path))
    spawn_ranks(_calibrate_worker, str(tmp_path))
    for r in range(2):
        masks = torch.load(tmp_path / f"masks{r}.pt", weights_only=True)
        assert all(torch.equal(masks[k], single[k]) for k in single)


@pytest.mark.parametrize("mode", ["standard", "talos", "linear", "lora", "llora"])
def test_distributed_training_matches_single_process(tmp_path, mode):
    single = _train(mode)
    spawn_ranks(_train_worker, str(tmp_path), mode)
    for r in range(2):
        sd = torch.load(tmp_path / f"{mode}{r}.pt", weights_only=True)
        for k, v in single.items():
            if k == "attn.in_proj_bias":
                # the key bias has an exactly-zero true gradient (softmax ignores a per-query constant), so
                # Adam turns float noise there into full steps: compare the q and v parts only
                v, sd[k] = torch.cat([v[:16], v[32:]]), torch.cat([sd[k][:16], sd[k][32:]])
            torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")] == ["ckpt.pt"]  # one copy


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (its worker loops and TCP transport loop)."""
    names = [(p / "comm").read_text().strip() for p in Path("/proc/self/task").iterdir()]
    return [n for n in names if "gloo" in n]


def _leave_at_exit_worker(rank, world, port, out_dir):
    import atexit

    from talos import distributed as dist

    join_env(rank, world, port)
    during = []
    # registered first, so it runs last: after the handler init_from_env registers
    atexit.register(lambda: Path(out_dir, f"exit{rank}.json").write_text(
        json.dumps([torch.distributed.is_initialized(), during, _gloo_threads()])))
    dist.init_from_env("cpu")
    during += _gloo_threads()
    x = torch.ones(3)
    torch.func.vjp(torch.sin, x)[1](x)  # imports torch._dynamo, and with it torch.distributed.nn, inside the group


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_a_rank_leaves_its_group_at_exit_even_after_torch_func(tmp_path):
    # a group outliving the interpreter (never destroyed, or pinned by an import-time default argument) has gloo
    # threads that die with it, which now and then aborts the process at exit (SIGABRT)
    spawn_ranks(_leave_at_exit_worker, str(tmp_path))
    for r in range(2):
        initialized, during, after = json.loads((tmp_path / f"exit{r}.json").read_text())
        assert during and not initialized and not after


def test_init_from_env_binds_the_gpu_before_the_group_and_leaves_at_exit(monkeypatch):
    from talos import distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist.atexit, "register", lambda fn: calls.append(("at_exit", fn.__name__)))
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():  # rank 3: the second node's GPU 1
        monkeypatch.setenv(name, value)
    assert dist.init_from_env() == "cuda:1"
    assert calls == [("set_device", 1), ("init", "nccl"), ("at_exit", "shutdown")]
    monkeypatch.setenv("WORLD_SIZE", "1")  # a plain run: nothing joined, the device as asked
    assert dist.init_from_env("cpu") == "cpu" and len(calls) == 3
