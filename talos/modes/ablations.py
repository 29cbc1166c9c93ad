"""Mask ablations at TaLoS's density: a random mask, and a mask of the smallest-|θ0| weights."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import FinetuneMode, ModeContext, SparseSettings, global_lowest, register_mode


class LowestScoreMask(FinetuneMode):
    """Sparse FT of the (1 - sparsity) eligible entries with the lowest ``scores`` (a mask ablation)."""

    settings = SparseSettings
    sparse = True

    def scores(self, ctx: ModeContext) -> dict[str, Tensor]:
        """Per eligible tensor, one score per entry (lowest = trainable)."""
        raise NotImplementedError

    def masks(self, ctx: ModeContext) -> dict[str, Tensor]:
        return global_lowest(self.scores(ctx), 1.0 - self.settings_of(ctx).sparsity)


@register_mode
class RandomMask(LowestScoreMask):
    """Ablation: sparse FT with a uniformly random mask of density (1 - sparsity) (seeded)."""

    name = "random_mask"

    def scores(self, ctx: ModeContext) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(ctx.seed)
        named = dict(ctx.model.named_parameters())
        return {n: torch.rand(named[n].shape, generator=g) for n in ctx.eligible}


@register_mode
class MagnitudeMask(LowestScoreMask):
    """Ablation: sparse FT of the smallest-|θ0| fraction (1 - sparsity) of eligible entries."""

    name = "magnitude_mask"

    def scores(self, ctx: ModeContext) -> dict[str, Tensor]:
        named = dict(ctx.model.named_parameters())
        return {n: named[n].detach().abs().cpu() for n in ctx.eligible}
