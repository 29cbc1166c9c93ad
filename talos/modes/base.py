"""The fine-tuning-mode interface: what a mode receives (ModeContext) and returns (masks, TrainState)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..config import NoSettings, Settings, setting
from ..registry import Registry
from ..task_vector import TaskVector
from ..train import setup_trainable


@dataclass
class SparseSettings(Settings):
    """Settings of every sparse mode: how much of the eligible entries stays frozen."""

    sparsity: float = setting(0.9, "fraction of eligible entries frozen (sparse modes)", low=0.0, high=1.0,
                              open_low=True, open_high=True)


@dataclass
class ModeContext:
    """Everything a mode may need; built by the domain script before any training."""

    model: nn.Module
    eligible: list[str]  # parameters the method may fine-tune (and that calibration scores)
    dense: list[str] = field(default_factory=list)  # trained densely by every parameter-space mode
    #: the mode's own settings (an instance of its ``settings`` class; None = that class's defaults)
    settings: Settings | None = None
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None  # per-example class scores [B, C]
    calibration_batches: Callable[[], Iterable[Any]] | None = None  # built lazily: only modes that need it
    zero_score_entries: int = 0  # always-kept entries outside `eligible` in the global ranking (calibrate_masks)
    seed: int = 0
    progress: bool = True
    on_round: Callable[[int, float, Mapping[str, Tensor]], None] | None = None
    # LoRA / L-LoRA: {parameter name: row slices or None}, e.g. the q and v rows of a fused in-projection
    lora_targets: Callable[[nn.Module], Mapping[str, Any]] | None = None
    # another mode's task vector for the same task and settings (LoTA reads the standard one)
    load_task_vector: Callable[[str], TaskVector] | None = None


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
    #: the mode's settings (a :class:`talos.config.Settings` dataclass): its flags, config.json entries and
    #: run-hash entries follow from the fields
    settings: type[Settings] = NoSettings
    #: task vectors are sparse by construction (uses --sparsity)
    sparse = False
    #: runs Fisher calibration (needs calibration data)
    needs_calibration = False
    #: evaluation goes through the first-order Taylor model around θ0
    eval_linearized = False
    #: reuse another mode's task vectors instead of training (post-hoc linearization)
    source_mode: str | None = None
    #: modes whose runs must exist first (LoTA needs standard)
    requires: tuple[str, ...] = ()
    #: runs are trained by the domain's finetune.py (False: produced by another script, e.g. an importer)
    trains = True
    #: the training settings that name the run folder (None: all of them; imported vectors keep only the seed,
    #: which draws a random-init θ0)
    training_settings: tuple[str, ...] | None = None

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

    def settings_of(self, ctx: ModeContext) -> Any:
        """``ctx.settings``, or this mode's defaults when the context carries none."""
        if ctx.settings is None:
            return self.settings()
        if not isinstance(ctx.settings, self.settings):
            raise TypeError(f"mode {self.name} takes {self.settings.__name__}, got {type(ctx.settings).__name__}")
        return ctx.settings

    def missing_hint(self, domain: str, task: str, settings: Settings, model: str, save: str) -> str | None:
        """How to produce a missing run of ``task`` when it is not ``finetune.py`` (None: the app's
        complete ``finetune.py`` command)."""
        return None

    def results_label(self, settings: Settings) -> str:
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
