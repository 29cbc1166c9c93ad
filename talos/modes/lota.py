"""LoTA (Panda et al. 2024): mask = top (1 − sparsity) of |τ| from a dense fine-tune, then sparse FT from θ0."""
from __future__ import annotations

from torch import Tensor

from .base import FinetuneMode, ModeContext, SparseSettings, global_lowest, register_mode


@register_mode
class LoTA(FinetuneMode):
    """LoTA: keep the largest-|τ_standard| fraction (1 - sparsity) trainable; the rest stays frozen."""

    name = "lota"
    settings = SparseSettings
    sparse = True
    requires = ("standard",)

    def masks(self, ctx: ModeContext) -> dict[str, Tensor]:
        if ctx.load_task_vector is None:
            raise ValueError("lota needs load_task_vector in its ModeContext (the standard run's τ)")
        tau = ctx.load_task_vector("standard")
        missing = [n for n in ctx.eligible if n not in tau]
        if missing:
            raise ValueError(f"standard task vector lacks eligible parameters: {missing[:5]}")
        # unselected weights stay frozen (the official vision code lets them move at 10% lr: a bug)
        return global_lowest({n: -tau[n].abs() for n in ctx.eligible}, 1.0 - self.settings_of(ctx).sparsity)
