"""Helpers shared by test modules of several packages: torchrun-style process groups on CPU, run folders."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

RUN_FILES = ["calibration.json", "config.json", "finetuned.safetensors", "manifest.json", "mask.safetensors",
             "metrics.json", "task_vector.safetensors"]  # a completed TaLoS fine-tuning run, one copy of each


def free_port() -> int:
    """A TCP port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_env(rank: int, world: int, port: int) -> None:
    """The environment ``torchrun`` gives rank ``rank`` of ``world`` (one torch thread: ranks share the cores)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def spawn_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes and wait for all of them."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")


def assert_one_copy_of_the_run(run_dir: Path, world: int = 2) -> None:
    """A fine-tuning run written by ``world`` ranks holds each artifact once (rank 0 writes) and says so."""
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == RUN_FILES  # (.lock)
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == world
