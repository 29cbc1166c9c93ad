"""Fine-tuning modes: one registry entry per method (``--finetuning-mode``); a mode decides which entries train.

A mode receives a :class:`ModeContext` (the model, its eligible parameters and the calibration data, all built
by a domain adapter) and returns the masks of trainable entries, or ``None`` for dense training of every
eligible parameter. Adding a method is one subclass and one ``@MODES.register`` line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .calibration import calibrate_masks
from .registry import Registry


@dataclass
class ModeContext:
    """Everything a mode may need; built by the domain script before any training."""

    model: nn.Module
    eligible: list[str]  # parameters that the method may fine-tune (and that calibration scores)
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None  # per-example class scores [B, C]
    calibration_batches: Callable[[], Iterable[Any]] | None = None  # built lazily: only modes that need it
    sparsity: float = 0.9
    rounds: int = 4
    soft_mask: float = 0.1
    fisher_target: str = "logit"
    fisher_draws: int = 1
    max_batches: int | None = None
    seed: int = 0
    progress: bool = True
    on_round: Callable[[int, float, Mapping[str, Tensor]], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FinetuneMode:
    """Base class: dense fine-tuning of the eligible parameters."""

    name = "base"
    #: whether this mode's task vectors are sparse by construction (only masked entries move)
    sparse = False
    #: whether this mode runs Fisher calibration (and so needs calibration data)
    needs_calibration = False

    def masks(self, ctx: ModeContext) -> dict[str, Tensor] | None:
        """Trainable-entry masks keyed by eligible parameter name, or None for dense training."""
        return None

    def describe(self) -> str:
        """One line for ``--help``."""
        return (self.__doc__ or self.name).strip().splitlines()[0]


MODES: Registry[FinetuneMode] = Registry("fine-tuning mode")


def register_mode(cls: type[FinetuneMode]) -> type[FinetuneMode]:
    """Class decorator: instantiate and register a mode under ``cls.name``."""
    MODES.register(cls.name)(cls())
    return cls


@register_mode
class Standard(FinetuneMode):
    """Non-linear fine-tuning: dense AdamW on every eligible parameter."""

    name = "standard"


@register_mode
class TaLoS(FinetuneMode):
    """TaLoS: fine-tune only the least Fisher-sensitive fraction (1 - sparsity) of eligible entries."""

    name = "talos"
    sparse = True
    needs_calibration = True

    def masks(self, ctx: ModeContext) -> dict[str, Tensor]:
        if ctx.forward_fn is None or ctx.calibration_batches is None:
            raise ValueError("talos mode needs forward_fn and calibration_batches in its ModeContext")
        return calibrate_masks(
            ctx.model,
            ctx.calibration_batches(),
            ctx.forward_fn,
            sparsity=ctx.sparsity,
            rounds=ctx.rounds,
            soft_mask=ctx.soft_mask,
            params=ctx.eligible,
            target=ctx.fisher_target,
            draws=ctx.fisher_draws,
            max_batches=ctx.max_batches,
            generator=torch.Generator().manual_seed(ctx.seed),
            progress=ctx.progress,
            callback=ctx.on_round,
        )


def get_mode(name: str) -> FinetuneMode:
    """The registered mode called ``name``; unknown names raise ValueError listing the valid ones."""
    return MODES.get(name)
