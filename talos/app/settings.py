"""The settings groups every domain shares: the optimisation step, evaluation, merges, runs and figures.

A domain's ``args.py`` declares its own model, data and training groups (its training group subclasses
:class:`StepSettings`); the method group is the union of the registered modes' settings and the merge group
the union of the registered merges' hyperparameters, both built when a parser is built, so a mode or merge
registered by any module imported before then gets its flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import Settings, derived, setting

__all__ = ["StepSettings", "EvaluationSettings", "RunSettings", "FigureSettings", "method_group", "merge_group",
           "merge_field"]


@dataclass
class StepSettings(Settings):
    """The end of every optimisation group: clipping, precision, seed, resume checkpoints."""

    grad_clip: float = setting(1.0, "max gradient norm (<= 0 disables)")
    precision: str | None = setting(None, "default: bf16 autocast on CUDA, fp32 on CPU", choices=("fp32", "bf16"),
                                    kind=str)
    seed: int = setting(0, "seed of every random stream of the run")
    checkpoint_every: int = setting(500, "optimizer steps between resume checkpoints", low=1, hashed=False)

    def for_task(self, task: str) -> "StepSettings":
        """The settings a run of ``task`` uses (a domain fills its per-task presets here)."""
        return self


@dataclass
class EvaluationSettings(Settings):
    """Coefficient grid, negation threshold, the merge method and evaluation batches."""

    n_eval_points: int = setting(21, "coefficients on [0, 1] for addition/negation", low=2)
    control_threshold: float = setting(0.95, "negation keeps control accuracy >= this x zero-shot", low=0.0,
                                       high=1.0, open_low=True)
    merge: str = setting("sum", "merge method (talos.merges.MERGES)")
    merge_variant: str = setting("official", "official: the rules of the official TaLoS scripts that produced the "
                                 "paper's baseline rows (talos/official_merges.py, normalised by each merge's own "
                                 "single-task accuracy); paper: the method papers' definitions (talos/merges.py)",
                                 choices=("paper", "official"))
    eval_batch_size: int = setting(256, "examples per evaluation batch", low=1, hashed=False)


@dataclass
class RunSettings(Settings):
    """Where artifacts go, the device, wandb, progress bars, shared results, interruption. None changes results."""

    save: str = setting("runs", "root folder of all artifacts", hashed=False)
    device: str | None = setting(None, "cuda, cpu, cuda:1 ... (default: cuda if available)", hashed=False, kind=str)
    wandb: bool = setting(False, "log to Weights & Biases (works with WANDB_MODE=offline)", hashed=False)
    wandb_project: str = setting("talos", "wandb project", hashed=False)
    wandb_entity: str | None = setting(None, "wandb entity", hashed=False, kind=str)
    no_progress: bool = setting(False, "hide progress bars", hashed=False)
    results_json: str | None = setting(None, "evaluation scripts also merge their results into this shared "
                                       "results.json", hashed=False, kind=str)
    stop_after: int | None = setting(None, "stop fine-tuning after this many optimizer steps, checkpoint kept "
                                     "(simulates an interruption; rerun without it to resume)", low=1, hashed=False,
                                     kind=int)
    plugins: list | None = setting(None, "comma-separated modules that register extra datasets when imported, loaded "
                                   "before validation (e.g. vision.synthetic, vision.demo.tasks; default: "
                                   "$TALOS_PLUGINS)", csv=True, kind=list, hashed=False)


@dataclass
class FigureSettings(Settings):
    """Fig. 7's gradient-drift recording (fine-tuning scripts): reads the model, changes nothing of training."""

    gradient_drift_every: int = setting(0, "record the gradient drift on a fixed probe batch every N optimizer "
                                        "steps (0 = off; Fig. 7, python <domain>/analyze.py gradient_drift)", low=0,
                                        hashed=False)
    gradient_drift_examples: int = setting(32, "probe examples (the first of the task's validation split)", low=1,
                                           hashed=False)


def method_group() -> type[Settings]:
    """``--finetuning-mode`` plus the union of every registered mode's settings (one flag per field)."""
    from ..config import merge_specs
    from ..modes import MODES

    fields: list[Any] = [("finetuning_mode", str, setting("talos", "fine-tuning mode (talos.modes.MODES)"))]
    for s in merge_specs([MODES.get(n).settings for n in MODES.names()]):
        fields.append((s.name, Any, _field_from(s)))
    return dataclasses.make_dataclass("MethodSettings", fields, bases=(Settings,))


def merge_field(method: str, hp: str) -> str:
    """The field (and, with dashes, the flag) of merge ``method``'s hyperparameter ``hp``: ``ties_k``."""
    return f"{method}_{hp}"


def merge_group() -> type[Settings]:
    """One field per hyperparameter of every registered merge (both variants): ``--ties-k``, ``--dare-p`` ...
    (a domain's own flag defaults, e.g. TALL-masks λ = 0.6 for nlp, come from its ``defaults``)."""
    from ..merges import all_hparams

    fields: list[Any] = [(merge_field(method, hp), Any, setting(default, f"{method}: {hp} (used by --merge {method})"))
                         for method, hps in all_hparams().items() for hp, default in hps.items()]
    return dataclasses.make_dataclass("MergeSettings", fields, bases=(Settings,))


def _field_from(s: Any) -> Any:
    """A dataclass field with the same declaration as the :class:`~talos.config.SettingSpec` ``s``."""
    if s.derived:
        return derived(s.default, s.help, hashed=s.hashed)
    return setting(s.default, s.help, choices=s.choices, hashed=s.hashed, flag=s.flag, low=s.low, high=s.high,
                   open_low=s.open_low, open_high=s.open_high, kind=s.kind, csv=s.csv)
