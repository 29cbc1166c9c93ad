"""Linearized fine-tuning (Ortiz-Jimenez et al. 2023) and post-hoc linearization of standard task vectors."""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..linearize import LinearizedModel
from ..task_vector import TaskVector
from ..train import setup_trainable
from .base import FinetuneMode, ModeContext, TrainState, register_mode


@register_mode
class Linear(FinetuneMode):
    """Linearized FT: train f(θ0) + J(θ0)(θ − θ0) with forward-mode JVPs; evaluate the same model."""

    name = "linear"
    eval_linearized = True

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        names = list(ctx.eligible) + list(ctx.dense)
        setup_trainable(ctx.model, ctx.eligible, None, ctx.dense)
        lin = LinearizedModel(ctx.model, names)  # θ0 copied now, before any update
        named = dict(ctx.model.named_parameters())
        trainable = [(n, named[n]) for n in names]

        def task_vector() -> TaskVector:
            return TaskVector({n: (named[n].detach() - t0).cpu() for n, t0 in lin.theta0().items()})

        return TrainState(lin, trainable, None, list(ctx.dense), task_vector)


@register_mode
class PostHoc(FinetuneMode):
    """Post-hoc linearization: standard task vectors evaluated through the linearized model."""

    name = "posthoc"
    eval_linearized = True
    source_mode = "standard"
