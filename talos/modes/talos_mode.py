"""TaLoS: fine-tune only the least Fisher-sensitive fraction of eligible entries (iterative calibration)."""
from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass

from ..calibration import calibrate_masks
from ..config import setting
from ..fisher import TARGETS
from .base import FinetuneMode, ModeContext, SparseSettings, register_mode


@dataclass
class CalibrationSettings(SparseSettings):
    """TaLoS's calibration: R rounds of Fisher scoring on the task's validation split."""

    calibration_rounds: int = setting(4, "TaLoS calibration rounds R", low=1)
    soft_mask: float = setting(0.1, "factor on dropped weights during later calibration rounds (0 = hard pruning)",
                               low=0.0, high=1.0)
    fisher_target: str = setting("logit", "what the Fisher score differentiates: the drawn class's logit "
                                 "(official code) or its log-probability", choices=tuple(TARGETS))
    fisher_draws: int = setting(1, "labels drawn per calibration example", low=1)
    calibration_batches: int | None = setting(None, "calibration batches per round (default: the whole "
                                              "validation split)", low=1, kind=int)
    calibration_batch_size: int | None = setting(None, "examples per calibration batch (default: the domain's "
                                                 "preset)", low=1, kind=int)


@register_mode
class TaLoS(FinetuneMode):
    """TaLoS: fine-tune only the least Fisher-sensitive fraction (1 - sparsity) of eligible entries."""

    name = "talos"
    settings = CalibrationSettings
    sparse = True
    needs_calibration = True

    def masks(self, ctx: ModeContext) -> dict[str, Tensor]:
        if ctx.forward_fn is None or ctx.calibration_batches is None:
            raise ValueError("talos mode needs forward_fn and calibration_batches in its ModeContext")
        s = self.settings_of(ctx)
        return calibrate_masks(
            ctx.model, ctx.calibration_batches(), ctx.forward_fn, sparsity=s.sparsity, rounds=s.calibration_rounds,
            soft_mask=s.soft_mask, params=ctx.eligible, target=s.fisher_target, draws=s.fisher_draws,
            max_batches=s.calibration_batches, generator=torch.Generator().manual_seed(ctx.seed),
            progress=ctx.progress, callback=ctx.on_round, zero_score_entries=ctx.zero_score_entries,
        )
