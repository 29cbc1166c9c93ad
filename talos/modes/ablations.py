"""Mask ablations at TaLoS's density: a random mask, and a mask of the smallest-|θ0| weights."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import FinetuneMode, ModeContext, SparseSettings, global_lowest, register_mode


@register_mode
class RandomMask(FinetuneMode):
    """Ablation: sparse FT with a uniformly random mask of density (1 - sparsity) (seeded)."""

    name = "random_mask"
    settings = SparseSettings
    sparse = True

    def masks(self, ctx: ModeContext) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(ctx.seed)
        named = dict(ctx.model.named_parameters())
        scores = {n: torch.rand(named[n].shape, generator=g) for n in ctx.eligible}
        return global_lowest(scores, 1.0 - self.settings_of(ctx).sparsity)


@register_mode
class MagnitudeMask(FinetuneMode):
    """Ablation: sparse FT of the smallest-|θ0| fraction (1 - sparsity) of eligible entries."""

    name = "magnitude_mask"
    settings = SparseSettings
    sparse = True

    def masks(self, ctx: ModeContext) -> dict[str, Tensor]:
        named = dict(ctx.model.named_parameters())
        return global_lowest({n: named[n].detach().abs().cpu() for n in ctx.eligible}, 1.0 - self.settings_of(ctx).sparsity)
