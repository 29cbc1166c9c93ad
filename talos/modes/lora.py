"""LoRA (rank 16, alpha 32 on q and v) and L-LoRA (its adapter branch linearized; Tang et al. 2024)."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from dataclasses import dataclass

from ..config import Settings, setting
from ..lora_layers import INITS, LoRAAdapters
from ..task_vector import TaskVector
from ..train import setup_trainable
from .base import FinetuneMode, ModeContext, TrainState, register_mode


@dataclass
class LoRASettings(Settings):
    """The adapters of LoRA and L-LoRA (rank 16, alpha 32 on q and v in the paper)."""

    lora_rank: int = setting(16, "LoRA / L-LoRA rank", low=1)
    lora_alpha: float = setting(32.0, "LoRA / L-LoRA alpha", low=0.0, open_low=True)
    lora_scaling: str = setting("alpha_over_rank", "LoRA update multiplier: alpha / rank (peft) or alpha (the "
                                "official vision code)", choices=("alpha", "alpha_over_rank"))
    lora_init: str | None = setting(None, "draw of the LoRA A factor (default: each mode's own: lora kaiming as "
                                    "peft, llora the official xavier)", choices=tuple(INITS), kind=str)


def _adapted(ctx: ModeContext, s: LoRASettings, *, linearized: bool, init: str) -> TrainState:
    """Freeze the base weights, attach adapters (W -> W + ΔW) and train only them; τ = ΔW after training.
    ``init`` is the mode's A0 draw unless ``s.lora_init`` overrides it."""
    if ctx.lora_targets is None:
        raise ValueError("LoRA modes need lora_targets in their ModeContext")
    setup_trainable(ctx.model, [], None, [])  # base weights frozen
    adapters = LoRAAdapters(ctx.model, ctx.lora_targets(ctx.model), rank=s.lora_rank, alpha=s.lora_alpha,
                            scaling=s.lora_scaling, init=s.lora_init or init, seed=ctx.seed)
    adapters.attach(ctx.model, linearized=linearized)
    delta = adapters.lin_delta if linearized else adapters.delta
    trainable = [(f"lora.{n}", p) for n, p in adapters.named_parameters()]
    return TrainState(
        ctx.model, trainable, None, [],
        task_vector=lambda: TaskVector({n: d.detach().cpu() for n, d in delta().items()}),
        cleanup=adapters.detach,
    )


@register_mode
class LoRA(FinetuneMode):
    """LoRA on the q and v projections; its task vector is the merged low-rank update."""

    name = "lora"
    settings = LoRASettings

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        # A0: nn.Linear's / peft's kaiming-uniform (the official code has no non-linear LoRA run to follow)
        return _adapted(ctx, self.settings_of(ctx), linearized=False, init="kaiming")


@register_mode
class LLoRA(FinetuneMode):
    """L-LoRA: each adapter branch linearized around (A0, B0 = 0), so ΔW = scale·B·A0; the network stays non-linear.

    As the official TaLoS vision code (``vision/lora.py``: a ``LinearizedModel`` around each q / v branch, the
    in-projection itself untouched) and Tang et al. 2024. Evaluation adds τ = scale·B·A0 to θ0 in the ordinary
    model, which equals the official evaluation (adapter parameters θ_A0 + α Σ Δ through the linearized branch)
    because the branch is linear in B and every task starts from the same seeded A0. A0 is drawn as the official
    code draws it (``xavier_uniform_`` on an ``nn.Linear(E, r)`` weight, times 1/sqrt(r)).
    """

    name = "llora"
    settings = LoRASettings

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        return _adapted(ctx, self.settings_of(ctx), linearized=True, init="xavier")
