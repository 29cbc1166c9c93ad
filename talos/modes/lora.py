"""LoRA (rank 16, alpha 32 on q and v) and L-LoRA (its adapter branch linearized; Tang et al. 2024)."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..lora import LoRAAdapters
from ..task_vector import TaskVector
from ..train import setup_trainable
from .base import FinetuneMode, ModeContext, TrainState, register_mode


def _adapted(ctx: ModeContext, *, linearized: bool, init: str) -> TrainState:
    """Freeze the base weights, attach adapters (W -> W + ΔW) and train only them; τ = ΔW after training.
    ``init`` is the mode's A0 draw unless ``ctx.lora_init`` overrides it."""
    if ctx.lora_targets is None:
        raise ValueError("LoRA modes need lora_targets in their ModeContext")
    setup_trainable(ctx.model, [], None, [])  # base weights frozen
    adapters = LoRAAdapters(ctx.model, ctx.lora_targets(ctx.model), rank=ctx.lora_rank, alpha=ctx.lora_alpha,
                            scaling=ctx.lora_scaling, init=ctx.lora_init or init, seed=ctx.seed)
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
    uses_lora = True

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        # A0: nn.Linear's / peft's kaiming-uniform (the official code has no non-linear LoRA run to follow)
        return _adapted(ctx, linearized=False, init="kaiming")


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
    uses_lora = True

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        return _adapted(ctx, linearized=True, init="xavier")
