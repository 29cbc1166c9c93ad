"""Input checks and dtype rules shared by the merge methods (:mod:`talos.merges`, :mod:`talos.official_merges`)."""
from __future__ import annotations

import math
import numbers
import zlib
from typing import Any, Mapping

import torch

from .task_vector import TaskVector

__all__ = ["tasks_of", "compute_dtype", "as_dtype", "count", "real", "integer", "fraction", "key_matches", "task_generator"]


def tasks_of(vectors: Mapping[str, TaskVector]) -> tuple[list[str], list[TaskVector], list[str]]:
    """Task names, their vectors and the shared key order; ValueError on empty or mismatched input."""
    names = list(vectors)
    if not names:
        raise ValueError("no task vectors to merge")
    vs = [vectors[n] for n in names]
    for n, v in zip(names, vs):
        if not isinstance(v, TaskVector):
            raise TypeError(f"task {n!r}: expected a TaskVector, got {type(v).__name__}")
    ref_name, ref = names[0], vs[0]
    keys = list(ref.keys())
    for n, v in zip(names[1:], vs[1:]):
        if set(v.keys()) != set(keys):
            diff = sorted(set(v.keys()) ^ set(keys))
            raise ValueError(f"task {n!r} and task {ref_name!r} have different keys (e.g. {diff[:4]})")
        bad = [k for k in keys if v[k].shape != ref[k].shape]
        if bad:
            raise ValueError(f"task {n!r} and task {ref_name!r} differ in shape for {bad[:4]}")
    return names, vs, keys


def compute_dtype(vs: list[TaskVector]) -> torch.dtype:
    """float64 if any input tensor is float64, else float32 (16-bit inputs are widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for v in vs for t in v.vector.values()) else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached in ``dtype``. May alias the input: callers never write into the result."""
    return t.detach().to(dtype)


def count(frac: float, n: int) -> int:
    """``floor(frac * n)`` clamped to [0, n]; rounding first so that e.g. 0.7 + 0.1 of 10 gives 8, not 7."""
    return max(0, min(n, math.floor(round(frac * n, 6))))


def real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def fraction(name: str, value: Any) -> float:
    """A kept fraction, in (0, 1]."""
    v = real(name, value)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v




def key_matches(key: str, patterns: str) -> bool:
    """``patterns``: ``"*"`` (every key), ``""`` (none), or comma-separated substrings (``"attn,mlp,conv"``)."""
    if patterns == "*":
        return True
    return any(p and p in key for p in patterns.split(","))


def task_generator(seed: int, task: str) -> torch.Generator:
    """A CPU generator seeded from (seed, task name), so a task's drop mask does not depend on the order
    or on which other tasks are merged (crc32: stable across processes, unlike ``hash``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(task.encode())) % 2**64)
