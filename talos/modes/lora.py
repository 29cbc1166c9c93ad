"""LoRA (rank 16, alpha 32 on q and v) and L-LoRA (its adapter branch linearized; Tang et al. 2024)."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..linearize import LinearizedModel
from ..lora import LoRAAdapters
from ..task_vector import TaskVector
from ..train import setup_trainable
from .base import FinetuneMode, ModeContext, TrainState, register_mode


def _adapters(ctx: ModeContext) -> LoRAAdapters:
    if ctx.lora_targets is None:
        raise ValueError("LoRA modes need lora_targets in their ModeContext")
    return LoRAAdapters(ctx.model, ctx.lora_targets(ctx.model), rank=ctx.lora_rank, alpha=ctx.lora_alpha,
                        scaling=ctx.lora_scaling, seed=ctx.seed)


@register_mode
class LoRA(FinetuneMode):
    """LoRA on the q and v projections; its task vector is the merged low-rank update."""

    name = "lora"
    uses_lora = True

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        setup_trainable(ctx.model, [], None, [])  # base weights frozen
        adapters = _adapters(ctx)
        adapters.attach(ctx.model)
        trainable = [(f"lora.{n}", p) for n, p in adapters.named_parameters()]
        return TrainState(
            ctx.model, trainable, None, [],
            task_vector=lambda: TaskVector({n: d.detach().cpu() for n, d in adapters.delta().items()}),
            cleanup=adapters.detach,
        )


@register_mode
class LLoRA(FinetuneMode):
    """L-LoRA: LoRA whose adapter branch is linearized around its initialisation; base weights frozen."""

    name = "llora"
    uses_lora = True
    eval_linearized = True

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        setup_trainable(ctx.model, [], None, [])
        adapters = _adapters(ctx)
        lin = LinearizedModel(ctx.model, adapters.names, delta_fn=adapters.lin_delta)
        lin.add_module("adapters", adapters)
        trainable = [(f"lora.{n}", p) for n, p in adapters.named_parameters()]
        return TrainState(
            lin, trainable, None, [],
            task_vector=lambda: TaskVector({n: d.detach().cpu() for n, d in adapters.lin_delta().items()}),
        )
