"""The fine-tuning-mode interface: what a mode receives (ModeContext) and returns (masks, TrainState)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..registry import Registry
from ..task_vector import TaskVector
from ..train import setup_trainable


@dataclass
class ModeContext:
    """Everything a mode may need; built by the domain script before any training."""

    model: nn.Module
    eligible: list[str]  # parameters the method may fine-tune (and that calibration scores)
    dense: list[str] = field(default_factory=list)  # trained densely by every parameter-space mode
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None  # per-example class scores [B, C]
    calibration_batches: Callable[[], Iterable[Any]] | None = None  # built lazily: only modes that need it
    sparsity: float = 0.9
    rounds: int = 4
    soft_mask: float = 0.1
    fisher_target: str = "logit"
    fisher_draws: int = 1
    max_batches: int | None = None
    zero_score_entries: int = 0  # always-kept entries outside `eligible` in the global ranking (calibrate_masks)
    seed: int = 0
    progress: bool = True
    on_round: Callable[[int, float, Mapping[str, Tensor]], None] | None = None
    # LoRA / L-LoRA: {parameter name: row slices or None}, e.g. the q and v rows of a fused in-projection
    lora_targets: Callable[[nn.Module], Mapping[str, Any]] | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_scaling: str = "alpha_over_rank"
    lora_init: str | None = None  # A0 draw, "kaiming" or "xavier" (talos.lora.INITS); None = the mode's default
    # another mode's task vector for the same task and settings (LoTA reads the standard one)
    load_task_vector: Callable[[str], TaskVector] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainState:
    """What the shared training loop needs from a mode, and how to read the task vector afterwards."""

    model: nn.Module  # the module ``loss_fn`` receives (possibly a wrapper: linearized model)
    named_params: list[tuple[str, nn.Parameter]]  # the trainable tensors
    masks: Mapping[str, Tensor] | None
    dense: list[str]
    task_vector: Callable[[], TaskVector]  # τ in the base model's parameter space, after training
    cleanup: Callable[[], None] = lambda: None  # undo model changes (e.g. LoRA parametrizations)


class FinetuneMode:
    """Base class: fine-tune the eligible parameters where ``masks`` allows (all of them if None)."""

    name = "base"
    #: task vectors are sparse by construction (uses --sparsity)
    sparse = False
    #: runs Fisher calibration (needs calibration data)
    needs_calibration = False
    #: uses the LoRA flags
    uses_lora = False
    #: evaluation goes through the first-order Taylor model around θ0
    eval_linearized = False
    #: reuse another mode's task vectors instead of training (post-hoc linearization)
    source_mode: str | None = None
    #: modes whose runs must exist first (LoTA needs standard)
    requires: tuple[str, ...] = ()
    #: runs are trained by the domain's finetune.py (False: produced by another script, e.g. an importer)
    trains = True

    def masks(self, ctx: ModeContext) -> dict[str, Tensor] | None:
        """Trainable-entry masks keyed by eligible parameter name, or None for dense training."""
        return None

    def prepare(self, ctx: ModeContext, masks: Mapping[str, Tensor] | None) -> TrainState:
        """Set up the model for training; default: parameter-space training of eligible (+ dense) tensors."""
        names = list(ctx.eligible) + list(ctx.dense)
        named = dict(ctx.model.named_parameters())
        theta0 = {n: named[n].detach().cpu().clone() for n in names}
        trainable = setup_trainable(ctx.model, ctx.eligible, masks, ctx.dense)

        def task_vector() -> TaskVector:
            cur = dict(ctx.model.named_parameters())
            return TaskVector.from_state_dicts(theta0, {n: cur[n].detach().cpu() for n in names})

        return TrainState(ctx.model, trainable, masks, list(ctx.dense), task_vector)

    def run_hparams(self, hparams: Mapping[str, Any], args: Any) -> dict[str, Any]:
        """The hyperparameters that name this mode's run folders, from the domain's (default: all of them)."""
        return dict(hparams)

    def missing_hint(self, domain: str, args: Any, task: str) -> str:
        """How to produce a missing run of ``task`` (part of the error the evaluation scripts raise)."""
        return (f"run: python {domain}/finetune.py --train-dataset {task} --finetuning-mode {self.name} "
                f"--model {args.model} --save {args.save} (with the same hyperparameters)")

    def results_label(self, args: Any) -> str:
        """This mode's row name in a shared results.json (``--results-json``)."""
        return self.name

    def describe(self) -> str:
        """One line for ``--help``."""
        return (self.__doc__ or self.name).strip().splitlines()[0]


MODES: Registry[FinetuneMode] = Registry("fine-tuning mode")


def register_mode(cls: type[FinetuneMode]) -> type[FinetuneMode]:
    """Class decorator: instantiate and register a mode under ``cls.name``."""
    MODES.register(cls.name)(cls())
    return cls


def get_mode(name: str) -> FinetuneMode:
    """The registered mode called ``name``; unknown names raise ValueError listing the valid ones."""
    return MODES.get(name)


def run_order() -> list[str]:
    """Names of the modes finetune.py trains, each after the modes it requires (launch scripts use it)."""
    out: list[str] = []

    def visit(n: str) -> None:
        if n in out:
            return
        m = MODES.get(n)
        for r in m.requires + ((m.source_mode,) if m.source_mode else ()):
            visit(r)
        out.append(n)

    for n in MODES.names():
        if MODES.get(n).trains:
            visit(n)
    return out


def global_lowest(scores: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """Masks keeping the floor(density · N) lowest scores over all tensors (ties by name order, index)."""
    from ..calibration import keep_lowest, kept_count

    names = list(scores)
    keep = {n: torch.ones_like(scores[n], dtype=torch.bool) for n in names}
    k = kept_count(density, sum(s.numel() for s in scores.values()))
    return {n: m.cpu() for n, m in keep_lowest({n: scores[n].float() for n in names}, keep, k, names).items()}
