"""torch.distributed helpers for ``torchrun`` launches: setup, rank-0 guards, sharding and all-reduce.

Every function is a no-op (or the identity) in a plain single-process run, so library code can call them
unconditionally. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import atexit
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

if dist.is_available():
    # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is first imported.
    # Imported after the process group exists (torch.func imports it through torch._dynamo, as the Fisher scorer
    # does), those defaults hold the group for the life of the process: destroy_process_group() cannot free it,
    # gloo's worker threads outlive the interpreter and abort the process at exit (SIGABRT). Imported now, the
    # defaults are None.
    import torch.distributed.nn.functional  # noqa: F401

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the only process that writes artifacts and logs."""
    return rank() == 0


def init_from_env(device: str | None = None) -> str:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK); returns the device.

    The group is left (:func:`shutdown`) when the process exits. Without those variables (a plain run) nothing
    happens and ``device`` is returned unchanged.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return device or ("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    want_cuda = (device or "cuda").startswith("cuda") and torch.cuda.is_available()
    if want_cuda:
        torch.cuda.set_device(local)  # before the group: NCCL then knows each rank's GPU instead of guessing it
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        atexit.register(shutdown)  # left while the interpreter is whole, not torn down with it
    return f"cuda:{local}" if want_cuda else "cpu"


def shutdown() -> None:
    """Leave the process group (``destroy_process_group``); a no-op outside one. Runs at exit after
    :func:`init_from_env`, so a script need not call it."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every world_size-th element starting at its rank."""
    return list(items)[rank() :: world_size()]


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """In-place sum of each tensor over ranks (no-op in a single process)."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
