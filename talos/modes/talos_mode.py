"""TaLoS: fine-tune only the least Fisher-sensitive fraction of eligible entries (iterative calibration)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..calibration import calibrate_masks
from .base import FinetuneMode, ModeContext, register_mode


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
            ctx.model, ctx.calibration_batches(), ctx.forward_fn, sparsity=ctx.sparsity, rounds=ctx.rounds,
            soft_mask=ctx.soft_mask, params=ctx.eligible, target=ctx.fisher_target, draws=ctx.fisher_draws,
            max_batches=ctx.max_batches, generator=torch.Generator().manual_seed(ctx.seed),
            progress=ctx.progress, callback=ctx.on_round, zero_score_entries=ctx.zero_score_entries,
        )
