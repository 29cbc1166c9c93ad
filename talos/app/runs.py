"""Run folders from a :class:`~talos.app.flags.Config`: what names a fine-tuning or evaluation run, and loading
the task vectors an evaluation reads (each missing one reported with the command that produces it).

A fine-tuning run's hash covers the task, the mode and every setting that changes results and differs from its
declared default: the model and data groups, the training group (with the task's presets filled in; not for
imported vectors) and the mode's own settings. An evaluation's hash covers the hashes of the runs it reads and
the protocol's settings that differ from their defaults.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from ..paths import EvalRun, FinetuneRun
    from ..task_vector import TaskVector
    from .flags import Config

__all__ = ["RunPaths", "finetune_hparams", "resolved_settings", "finetune_command"]

#: evaluation settings that name each protocol's results (the merge ones only when a merge other than sum runs).
PROTOCOL_SETTINGS = {"single_task": (), "addition": ("n_eval_points",),
                     "negation": ("n_eval_points", "control_threshold")}


def _run_entries(cfg: "Config", task: str, *, changed_only: bool) -> dict[str, Any]:
    """The result-changing settings of ``task``'s run under ``cfg``'s mode (``changed_only``: those that differ
    from their declared default, the hash's entries)."""
    from ..config import specs_of
    from ..modes import MODES

    mode = MODES.get(cfg.finetuning_mode)
    training = cfg.group("training").for_task(task)
    out: dict[str, Any] = {}
    for g in (cfg.group("model"), cfg.group("data"), training, cfg.mode_settings()):
        values = g.hashed() if changed_only else {s.name: getattr(g, s.name) for s in specs_of(type(g)) if s.hashed}
        if g is training and mode.training_settings is not None:  # e.g. imported: someone else's schedule
            values = {k: v for k, v in values.items() if k in mode.training_settings}
        out.update(values)
    return out


def finetune_hparams(cfg: "Config", task: str) -> dict[str, Any]:
    """The run hash's entries: task, mode, and the non-default result-changing settings."""
    return {"mode": cfg.finetuning_mode, "task": task, **_run_entries(cfg, task, changed_only=True)}


def resolved_settings(cfg: "Config", task: str) -> dict[str, Any]:
    """Every result-changing setting of ``task``'s run with its value, defaults included (saved in
    ``config.json``; a resumed or reused run must match it, since the hash omits defaults)."""
    return _run_entries(cfg, task, changed_only=False)


class RunPaths:
    """A domain's run folders: ``finetune(cfg, task)``, ``evaluation(cfg, protocol)``, ``task_vectors``."""

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def finetune(self, cfg: "Config", task: str) -> "FinetuneRun":
        """Where the fine-tuning run of ``task`` under ``cfg`` lives."""
        from ..paths import FinetuneRun

        return FinetuneRun(cfg.save, self.domain, cfg.model, cfg.finetuning_mode, task,
                           finetune_hparams(cfg, task))

    def evaluation(self, cfg: "Config", protocol: str) -> "EvalRun":
        """Where an evaluation's results live: hashed over the task runs it reads and its own settings."""
        from ..paths import EvalRun

        ev = cfg.group("evaluation")
        h: dict[str, Any] = {"runs": {t: self.finetune(cfg, t).hash for t in sorted(cfg.eval_datasets)},
                             "mode": cfg.finetuning_mode}
        h.update({k: v for k, v in ev.hashed().items() if k in PROTOCOL_SETTINGS[protocol]})
        if protocol == "negation":
            h["control"] = cfg.control_dataset
        if protocol != "single_task" and cfg.merge != "sum":
            h["merge"] = cfg.merge
            h["merge_kwargs"] = cfg.merge_hparams()
        return EvalRun(cfg.save, self.domain, cfg.model, protocol, h)

    def task_vectors(self, cfg: "Config", tasks: Sequence[str], mode: str | None = None) -> dict[str, "TaskVector"]:
        """The task vectors of ``tasks`` for ``mode`` (default: the mode whose vectors ``cfg``'s mode
        evaluates, e.g. ``standard`` for ``posthoc``); a missing one names the command that produces it."""
        from ..modes import get_mode

        if mode is None:
            m = get_mode(cfg.finetuning_mode)
            mode = m.source_mode or m.name
        mcfg = cfg.replace(finetuning_mode=mode)
        return load_checked_task_vectors(self.domain, mcfg, {t: self.finetune(mcfg, t) for t in tasks})


def finetune_command(domain: str, cfg: "Config", task: str) -> str:
    """The complete ``finetune.py`` command producing ``cfg``'s run of ``task``: the script's own command
    line with the task and mode replaced (every script of a domain shares one parser)."""
    argv = cfg.argv
    out: list[str] = []
    skip = {"--train-dataset", "--finetuning-mode", "--eval-datasets", "--control-dataset", "--results-json",
            "--merge", "--stop-after"}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.split("=", 1)[0] in skip:
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return shlex.join(["python", f"{domain}/finetune.py", "--train-dataset", task, "--finetuning-mode",
                       cfg.finetuning_mode, *out])


def load_checked_task_vectors(domain: str, cfg: "Config", runs: Mapping[str, "FinetuneRun"]) -> dict[str, "TaskVector"]:
    """Load each run's task vector after checking it against the run's manifest and for NaN/inf.

    Every missing or untrusted run is listed in one error, each with the complete command that (re)builds it.
    """
    from ..io import MANIFEST
    from ..modes import get_mode
    from ..stages import check_finite_task_vector
    from ..task_vector import TaskVector

    m = get_mode(cfg.finetuning_mode)
    problems = []
    for t, run in runs.items():
        if not run.task_vector.exists():
            why = "missing"
        elif (run.dir / MANIFEST).exists() and (bad := _first_problem(run.task_vector, run.metrics)) is not None:
            why = f"not trusted ({bad})"  # damaged, or the run has not finished
        else:
            continue  # complete, or written before manifests existed (then only its content is checked)
        hint = m.missing_hint(domain, t, cfg.mode_settings(), cfg.model, cfg.save)
        hint = hint or f"run:\n    {finetune_command(domain, cfg, t)}"
        problems.append(f"  {t} ({m.name}): {run.task_vector} is {why}; {hint}")
    if problems:
        raise FileNotFoundError(f"{len(problems)} fine-tuning run(s) needed first:\n" + "\n".join(problems))
    out = {}
    for t, run in runs.items():
        tv = TaskVector.load(run.task_vector)
        check_finite_task_vector(tv, run.task_vector)
        out[t] = tv
    return out


def _first_problem(*paths: Path) -> str | None:
    """``"<name>: <why>"`` for the first of ``paths`` that does not match its manifest, else None."""
    from ..io import check_artifact

    for p in paths:
        if (bad := check_artifact(p)) is not None:
            return f"{p.name}: {bad}"
    return None
