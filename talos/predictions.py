"""Class predictions of a model over a split's batches, and their accuracy: one loop for every domain.

A domain supplies its batches and ``scores(model, batch) -> [B, C]`` (CLIP logits, rank-classification
log-likelihoods); the prediction is the argmax, computed under bf16 autocast when the precision asks for it.
Under ``torchrun`` each rank passes its own shard of the split and :func:`count_accuracy` sums the counts, so
every rank returns the accuracy of the whole split.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from . import distributed as dist
from .train import PRECISIONS

__all__ = ["predictions", "count_accuracy"]

Scores = Callable[[nn.Module, Any], Tensor]  # (model, batch) -> [B, C] class scores


def _predicted(model: nn.Module, batches: Iterable[Any], scores: Scores, device: torch.device,
               precision: str) -> Iterator[tuple[Tensor, Any]]:
    """(argmax class indices [B] on the CPU, batch) for each batch."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for batch in batches:
        with autocast:
            pred = scores(model, batch).argmax(-1).cpu()
        yield pred, batch


@torch.no_grad()
def predictions(model: nn.Module, batches: Iterable[Any], scores: Scores, *, device: torch.device,
                precision: str = "fp32") -> Tensor:
    """Predicted class indices [N] of ``model`` over ``batches``, in batch order (this process's batches only)."""
    return torch.cat([pred for pred, _ in _predicted(model, batches, scores, device, precision)])


@torch.no_grad()
def count_accuracy(model: nn.Module, batches: Iterable[Any], scores: Scores, labels: Callable[[Any], Tensor], *,
                   device: torch.device, precision: str = "fp32") -> float:
    """Fraction of examples whose predicted class equals ``labels(batch)`` [B], counted over ``batches`` and
    summed over ``torchrun`` ranks (each rank passes its shard). An empty split gives 0.0."""
    correct = total = 0
    for pred, batch in _predicted(model, batches, scores, device, precision):
        correct += int((pred == labels(batch)).sum())
        total += len(pred)
    counts = torch.tensor([correct, total], dtype=torch.float64, device=device)  # float64: exact up to 2**53
    dist.all_reduce_sum_([counts])
    return float(counts[0]) / max(1.0, float(counts[1]))
