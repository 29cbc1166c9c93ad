"""The one training loop shared by every domain and mode: masked AdamW, clip-then-mask, exact resume.

The loop is deliberately small. Domains supply a dataset, a ``loss_fn(model, batch)`` and the trainable
parameters; modes supply masks. Order of operations per optimizer step (paper-notes §1.4):

1. forward/backward over ``accumulation`` micro-batches (bf16 autocast on CUDA if asked);
2. clip the gradient norm over the FULL gradients of every tensor with at least one trainable entry (frozen
   entries of partially trainable tensors included, as the official code does), then
3. the masked AdamW step, which ignores masked-out entries, and the learning-rate schedule.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and checkpoints hold the trainable
tensors, optimizer, scheduler and RNG states, so an interrupted run resumes to the same result.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist
from .io import atomic_torch_save, check_artifact, forget_artifact, record_artifact, torch_load
from .optim import MaskedAdamW, freeze_masked_out
from .rng import SeededDataset, seed_all, stream_seed

logger = logging.getLogger("talos")

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Optimisation settings. Give ``epochs`` or ``steps`` (optimizer steps); ``batch_size`` is the global
    batch of one optimizer step, split into ``accumulation`` micro-batches."""

    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 128
    accumulation: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 500
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    num_workers: int = 0

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings (called before any work)."""
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        if (self.epochs is not None and self.epochs < 1) or (self.steps is not None and self.steps < 1):
            raise ValueError("epochs/steps must be positive")
        if self.batch_size < 1 or self.accumulation < 1 or self.batch_size % self.accumulation:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of accumulation ({self.accumulation})"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; valid choices: {', '.join(PRECISIONS)}")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warm-up, then cosine to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def setup_trainable(
    model: nn.Module,
    eligible: Sequence[str],
    masks: Mapping[str, Tensor] | None,
    dense: Sequence[str] = (),
) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` so that exactly the trainable tensors get gradients; return them by name.

    ``eligible`` tensors train where ``masks`` is True (all entries if ``masks`` is None); ``dense`` tensors
    train densely; everything else is frozen. Tensors whose mask is all False are frozen entirely, so autograd
    skips their weight gradients (where TaLoS saves time and memory).
    """
    named = dict(model.named_parameters())
    unknown = [n for n in list(eligible) + list(dense) if n not in named]
    if unknown:
        raise ValueError(f"unknown parameter names: {unknown[:5]}")
    both = set(eligible) & set(dense)
    if both:
        raise ValueError(f"parameters both eligible and dense: {sorted(both)[:5]}")
    train = set(eligible) | set(dense)
    for n, p in named.items():
        p.requires_grad_(n in train)
    if masks is not None:
        missing = [n for n in eligible if n not in masks]
        if missing:
            raise ValueError(f"no mask for eligible parameters: {missing[:5]}")
        freeze_masked_out([(n, named[n]) for n in eligible], masks)
    return [(n, p) for n, p in named.items() if p.requires_grad]


def build_optimizer(
    named_params: Sequence[tuple[str, nn.Parameter]],
    masks: Mapping[str, Tensor] | None,
    dense: Sequence[str],
    lr: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """Plain AdamW for dense training, MaskedAdamW (state only for trainable entries) otherwise."""
    if masks is None:
        return torch.optim.AdamW([p for _, p in named_params], lr=lr, weight_decay=weight_decay)
    m = {n: masks[n] for n, _ in named_params if n in masks}
    return MaskedAdamW(named_params, m, lr=lr, weight_decay=weight_decay,
                       dense=[n for n, _ in named_params if n in set(dense)])


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
          "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_to_tuple(st["python"]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _epoch_batches(n: int, batch_size: int, micro: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Per optimizer step, its micro-batches of dataset indices, from a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    steps = []
    for s in range(0, n, batch_size):
        chunk = perm[s : s + batch_size]
        steps.append([chunk[i : i + micro] for i in range(0, len(chunk), micro)])
    return steps


def _rank_share(micro_batches: list[list[int]], rank: int, world: int, accumulation: int) -> list[list[int]]:
    """Split one optimizer step's examples contiguously over ranks, then into ``accumulation`` micro-batches.

    A rank left without examples (a final batch smaller than the world) gets the step's first example as a
    placeholder, marked by a negative index (-1 - i); it is loaded but contributes zero weight.
    """
    flat = [i for mb in micro_batches for i in mb]
    per = -(-len(flat) // world)
    mine = flat[rank * per : (rank + 1) * per]
    if not mine:
        return [[-1 - flat[0]]]
    size = -(-len(mine) // accumulation)
    return [mine[i : i + size] for i in range(0, len(mine), size)]


def _count(mb: list[int]) -> int:
    return sum(1 for i in mb if i >= 0)


class _Indices(torch.utils.data.Sampler):
    """Batch sampler over precomputed micro-batches (placeholder indices mapped back to real ones)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        for mb in self.batches:
            yield [i if i >= 0 else -1 - i for i in mb]

    def __len__(self) -> int:
        return len(self.batches)


def _global_count(micro_batches: list[list[int]], world: int, device: torch.device) -> int:
    """Examples in the whole optimizer step (all ranks)."""
    n = sum(_count(mb) for mb in micro_batches)
    if world > 1:
        t = torch.tensor([float(n)], dtype=torch.float64, device=device)
        dist.all_reduce_sum_([t])
        n = int(t.item())
    return max(1, n)


def train(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    named_params: Sequence[tuple[str, nn.Parameter]],
    masks: Mapping[str, Tensor] | None,
    cfg: TrainConfig,
    *,
    dense: Sequence[str] = (),
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    collate_fn: Callable | None = None,
    on_log: Callable[[int, Mapping[str, float]], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``named_params`` of ``model`` on ``dataset``; resume from ``checkpoint_path`` if it exists.

    ``loss_fn(model, batch)`` returns the mean loss of a micro-batch. ``stop_after`` ends the run after that
    many optimizer steps (used by tests to simulate an interruption; the checkpoint is written first).
    ``on_step(step)`` is called after every optimizer step (e.g. :class:`talos.analysis.GradientDrift`).
    Returns a summary dict (steps, last loss, seconds).

    Under ``torchrun`` the model is wrapped in DistributedDataParallel: each optimizer step's global batch
    (``cfg.batch_size`` examples) is split over ranks, so batch size, accumulation and the learning-rate
    schedule keep their single-process meaning; only rank 0 writes the checkpoint and calls ``on_log``.
    """
    cfg.validate()
    device = torch.device(device)
    steps_per_epoch, total = _step_counts(len(dataset), cfg)
    params = [p for _, p in named_params]
    opt = build_optimizer(named_params, masks, dense, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, total, cfg.schedule))
    ckpt = _Checkpointer(checkpoint_path, named_params, opt, sched, cfg)
    step = ckpt.restore(total)
    runner = _wrap_ddp(model, device, named_params)
    log = _StepLog(progress, total, step, on_log, cfg.log_every)
    model.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    ckpt.start_clock()
    last_loss = float("nan")
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        plan = _epoch_plan(len(dataset), cfg, epoch)[in_epoch:]
        it = iter(_epoch_loader(dataset, [mb for s in plan for mb in s], cfg, epoch, collate_fn, device))
        for micro_batches in plan:
            if step >= total:
                break
            loss = _accumulate(runner, it, micro_batches, loss_fn, autocast, cfg, step, device)
            _optimizer_step(params, opt, sched, loss, cfg, step)
            step, last_loss = step + 1, loss
            if on_step is not None:
                on_step(step)
            log.step(step, loss, opt.param_groups[0]["lr"], epoch)
            stopping = stop_after is not None and step >= stop_after
            if stopping or step % cfg.checkpoint_every == 0:
                ckpt.save(step)
            if stopping:
                return log.close(step, last_loss, ckpt.seconds(), interrupted=True)
    return log.close(step, last_loss, ckpt.seconds(), interrupted=False)


def _step_counts(n: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for ``n`` examples; ValueError on an empty dataset or a
    global batch that does not split evenly over accumulation x ranks."""
    if n == 0:
        raise ValueError("training dataset is empty")
    world = dist.world_size()
    if cfg.batch_size % (cfg.accumulation * world):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of accumulation x world size "
                         f"({cfg.accumulation} x {world})")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch  # type: ignore[operator]
    return steps_per_epoch, total


def _epoch_plan(n: int, cfg: TrainConfig, epoch: int) -> list[list[list[int]]]:
    """This rank's micro-batches of dataset indices for every optimizer step of ``epoch``.

    Under torchrun each rank takes its contiguous share of each global batch (:func:`_rank_share`).
    """
    plan = _epoch_batches(n, cfg.batch_size, cfg.batch_size // cfg.accumulation, cfg.seed, epoch)
    world = dist.world_size()
    if world > 1:
        plan = [_rank_share(step_mbs, dist.rank(), world, cfg.accumulation) for step_mbs in plan]
    return plan


def _optimizer_step(params: Sequence[nn.Parameter], opt: torch.optim.Optimizer, sched: Any, loss: float,
                    cfg: TrainConfig, step: int) -> None:
    """Clip the accumulated gradients, refuse a non-finite step, then step optimizer and schedule."""
    # the norm over all gradients (inf max_norm: measured, not clipped) catches NaN/inf gradients
    gnorm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                           cfg.grad_clip if cfg.grad_clip is not None else float("inf"))
    check_finite_step(step + 1, loss, float(gnorm), cfg)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


class _StepLog:
    """Progress bar (rank 0) and ``on_log`` calls every ``log_every`` steps and at the last step."""

    def __init__(self, progress: bool, total: int, step: int,
                 on_log: Callable[[int, Mapping[str, float]], None] | None, log_every: int) -> None:
        self.bar = _progress_bar(progress, total, step)
        self.total, self.on_log, self.log_every = total, on_log, log_every

    def step(self, step: int, loss: float, lr: float, epoch: int) -> None:
        """Report optimizer step ``step`` (1-based, already taken)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.on_log is not None and dist.is_main() and (step % self.log_every == 0 or step == self.total):
            self.on_log(step, {"train/loss": loss, "train/lr": lr, "train/epoch": epoch})

    def close(self, step: int, loss: float, seconds: float, *, interrupted: bool) -> dict[str, Any]:
        """Close the bar; the run summary :func:`train` returns."""
        if self.bar is not None:
            self.bar.close()
        return {"steps": step, "total_steps": self.total, "loss": loss, "seconds": seconds,
                "interrupted": interrupted}


class _Checkpointer:
    """The resume checkpoint of one run (``path`` None: none is kept) and the wall time spent over all attempts."""

    def __init__(self, path: str | Path | None, named_params: Sequence[tuple[str, nn.Parameter]],
                 opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig) -> None:
        self.path = Path(path) if path is not None else None
        self.named_params, self.opt, self.sched, self.cfg = named_params, opt, sched, cfg
        self.seconds_before = 0.0
        self.t0 = 0.0  # set by start_clock

    def restore(self, total: int) -> int:
        """Load the checkpoint if there is one (:func:`_restore`); returns the step to continue from."""
        step, self.seconds_before = _restore(self.path, self.named_params, self.opt, self.sched, self.cfg, total)
        return step

    def start_clock(self) -> None:
        """Training time is counted from here (plus what earlier attempts spent)."""
        self.t0 = time.time()

    def seconds(self) -> float:
        """Seconds spent training by this attempt and the ones it resumes."""
        return self.seconds_before + time.time() - self.t0

    def save(self, step: int) -> None:
        """Write the resume state after optimizer step ``step`` (:func:`_save_checkpoint`)."""
        _save_checkpoint(self.path, step, self.named_params, self.opt, self.sched, self.cfg, self.seconds())


def _save_checkpoint(ckpt: Path | None, step: int, named_params: Sequence[tuple[str, nn.Parameter]],
                     opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, seconds: float) -> None:
    """Atomically write the resume state (rank 0; every rank's RNG state gathered) and record it in the manifest."""
    if ckpt is None:
        return
    world = dist.world_size()
    rngs = [_rng_state()]
    if world > 1:  # every rank's RNG (augmentations differ per rank), saved by rank 0
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, _rng_state())
    if dist.is_main():
        atomic_torch_save(ckpt, {
            "step": step,
            "params": {n_: p.detach().cpu() for n_, p in named_params},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rngs,
            "config": asdict(cfg),
            "seconds": seconds,
        })
        record_artifact(ckpt)
    dist.barrier()


def _wrap_ddp(model: nn.Module, device: torch.device, named_params: Sequence[tuple[str, Tensor]]) -> nn.Module:
    """The module the loss is computed through: DistributedDataParallel under torchrun, else ``model`` itself.

    DDP all-reduces the gradients of ``model``'s own parameters only: a trained tensor the model does not own
    would silently differ between ranks, so that raises."""
    if dist.world_size() == 1:
        return model
    owned = {id(p) for p in model.parameters()}
    outside = [n for n, p in named_params if id(p) not in owned]
    if outside:
        raise ValueError(f"{len(outside)} trained tensor(s) are not parameters of the model, so DDP would not "
                         f"synchronise them across ranks: {', '.join(outside[:5])}")
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _progress_bar(progress: bool, total: int, step: int) -> Any:
    """A tqdm bar over optimizer steps on rank 0 (None when hidden)."""
    if not (progress and dist.is_main()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="fine-tuning", leave=False)


def _restore(ckpt: Path | None, named_params: Sequence[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer,
             sched: Any, cfg: TrainConfig, total: int) -> tuple[int, float]:
    """Load the resume checkpoint into params, optimizer, scheduler and RNGs: (step, seconds spent before).

    A checkpoint whose manifest entry does not check out is discarded (training restarts from step 0); one
    written under a different training configuration is refused (:func:`check_resume_config`).
    """
    world, rank = dist.world_size(), dist.rank()
    if ckpt is not None and ckpt.exists() and dist.is_main() and (bad := check_artifact(ckpt, legacy_ok=True)):
        logger.warning("discarding checkpoint %s (%s): training restarts from step 0", ckpt, bad)
        forget_artifact(ckpt)
        ckpt.unlink()
    dist.barrier()
    if ckpt is None or not ckpt.exists():
        return 0, 0.0
    state = torch_load(ckpt)
    check_resume_config(ckpt, state.get("config", {}), cfg)
    named = dict(named_params)
    if set(state["params"]) != set(named):
        raise ValueError(f"checkpoint {ckpt} does not match the trainable parameters of this run")
    with torch.no_grad():
        for k, v in state["params"].items():
            if named[k].shape != v.shape:
                raise ValueError(f"checkpoint {ckpt}: shape mismatch for {k}")
            named[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    _set_rng_state(rngs[rank] if isinstance(rngs, list) and len(rngs) == world else
                   (rngs[0] if isinstance(rngs, list) else rngs))
    step = int(state["step"])
    logger.info("resumed from %s at step %d/%d", ckpt, step, total)
    return step, float(state.get("seconds", 0.0))


def _epoch_loader(dataset: torch.utils.data.Dataset, indices: list, cfg: TrainConfig, epoch: int,
                  collate_fn: Callable | None, device: torch.device) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of one epoch, in order. Augmentations are drawn per (epoch, example), so they do
    not depend on the number of workers, the resume point or what earlier stages consumed (talos.rng)."""
    seeded = SeededDataset(dataset, cfg.seed, "train-augment", epoch)
    return torch.utils.data.DataLoader(
        seeded, batch_sampler=_Indices(indices), num_workers=cfg.num_workers, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch), pin_memory=device.type == "cuda",
    )


def _accumulate(runner: nn.Module, it: Any, micro_batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], Tensor],
                autocast: Any, cfg: TrainConfig, step: int, device: torch.device) -> float:
    """Forward and backward every micro-batch of one optimizer step; returns the step's mean loss (all ranks)."""
    world, rank = dist.world_size(), dist.rank()
    batch_n = _global_count(micro_batches, world, device)
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        batch = next(it)
        # dropout: its own stream per (step, rank, micro-batch), seeded after loading (see talos.rng)
        seed_all(stream_seed(cfg.seed, "dropout", step, rank, i))
        last = i == len(micro_batches) - 1
        sync = runner.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
        with sync:
            with autocast:
                loss = loss_fn(runner, batch)
            # weight each micro-batch by its share of the global batch; DDP averages over ranks,
            # hence the factor world: the gradient is the mean over the whole global batch
            (loss * (_count(mb) * world / batch_n)).backward()
        loss_sum += float(loss.detach()) * _count(mb) / batch_n
    if world > 1:
        t = torch.tensor([loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce_sum_([t])
        loss_sum = float(t.item())
    return loss_sum

class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the run is left incomplete (its checkpoint, if any,
    holds the last finite state)."""


def check_finite_step(step: int, loss: float, grad_norm: float, cfg: TrainConfig) -> None:
    """DivergenceError at the first optimizer step whose loss or gradient norm is NaN or infinite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    value = loss if not math.isfinite(loss) else grad_norm
    raise DivergenceError(
        f"training diverged: {what} is {value} at optimizer step {step} (lr {cfg.lr}, precision {cfg.precision}); "
        "nothing was saved as finished. Try a lower --lr, a longer --warmup-length, --grad-clip 1.0, or "
        "--precision fp32, then rerun (the run resumes from its last checkpoint, or delete checkpoint.pt to restart)"
    )


#: TrainConfig fields that do not change results: a checkpoint may be resumed with other values.
RESUME_FREE = ("num_workers", "checkpoint_every", "log_every")


def check_resume_config(path: Path, saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    """ValueError naming the checkpoint when it was written under different settings than ``cfg``."""
    now = asdict(cfg)
    diff = sorted(k for k in set(now) | set(saved) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise ValueError(f"{path} was written with other settings ({detail}); rerun with the original flags, "
                         "or delete the checkpoint to restart this run from scratch")
