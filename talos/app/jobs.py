"""The scripts' jobs over a :class:`~talos.app.flags.Config`: start (or skip, or resume) a fine-tuning run, build
its :class:`~talos.modes.ModeContext` and tracker, and run one evaluation protocol (:mod:`talos.stages` does
the work)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .. import distributed as dist
from ..io import forget_artifact, read_json
from ..modes import FinetuneMode, ModeContext, get_mode
from ..paths import FinetuneRun
from ..runinfo import run_metadata, seed_everything
from ..stages import PROTOCOLS, hold_run_lock, release_run_lock, run_complete, run_protocol
from ..tracking import Tracker
from .runs import RunPaths, resolved_settings

if TYPE_CHECKING:
    from ..protocols import Evaluate
    from .flags import Config

logger = logging.getLogger("talos")

__all__ = ["FinetuneJob", "start_finetune", "mode_context", "evaluate", "check_saved_settings"]


@dataclass
class FinetuneJob:
    """A fine-tuning job after its checks: ``done`` holds the metrics when the run already completed."""

    mode: FinetuneMode
    run: FinetuneRun
    cfg: "Config"
    tracker: Tracker
    done: dict[str, Any] | None = None


def check_saved_settings(run: FinetuneRun, current: dict[str, Any]) -> None:
    """ValueError when ``run``'s saved config.json records a result-changing setting with a value other than
    ``current``'s (the hash omits defaults, so a changed default would otherwise resume or reuse a run made
    under the old one). A setting the saved config lacks (added since) passes."""
    if not run.config.exists():
        return
    saved = read_json(run.config).get("resolved")
    if saved is None:
        return
    diff = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    if diff:
        listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{run.dir} was made with other settings ({listed}); it cannot be resumed or reused "
                         "under this configuration: delete the folder or use another --save")


def _skip_if_complete(run: FinetuneRun, job: FinetuneJob) -> FinetuneJob | None:
    if run_complete(run) is None:
        logger.info("skip: %s already has its task vector (%s)", run.task, run.dir)
        job.done = read_json(run.metrics)
        return job
    return None


def start_finetune(cfg: "Config", *, runs: RunPaths) -> FinetuneJob:
    """Resolve the mode, skip a completed run, refuse one made under other settings, fail fast on missing
    inputs, write the config, open wandb.

    A mode that reuses another's task vectors (``posthoc`` -> ``standard``) fine-tunes that mode instead;
    a mode that reads another's task vector (LoTA) fails here, before any model loads, when it is missing.
    Call after ``dist.init_from_env`` and after the data checks; seeds the RNGs last.
    """
    mode = get_mode(cfg.finetuning_mode)
    if mode.source_mode is not None:  # e.g. posthoc evaluates standard task vectors: make sure they exist
        logger.info("%s reuses %s task vectors", mode.name, mode.source_mode)
        cfg = cfg.replace(finetuning_mode=mode.source_mode)
        mode = get_mode(mode.source_mode)
    task = cfg.train_dataset
    run = runs.finetune(cfg, task)
    resolved = resolved_settings(cfg, task)
    check_saved_settings(run, resolved)
    job = FinetuneJob(mode, run, cfg, Tracker(False))
    if _skip_if_complete(run, job):
        return job
    for req in mode.requires:  # e.g. LoTA reads the standard run's task vector: fail now, not after loading
        runs.task_vectors(cfg, [task], mode=req)
    hold_run_lock(run)  # a second process on this run exits here, naming the PID of the first
    if _skip_if_complete(run, job):  # finished by another process between the check above and the lock
        release_run_lock(run)
        return job
    if dist.is_main() and (run.task_vector.exists() or run.metrics.exists()):
        logger.warning("recomputing %s: %s", run.dir, run_complete(run))
        for p in (run.metrics, run.task_vector, run.finetuned):
            forget_artifact(p)
            p.unlink(missing_ok=True)
    config = {"settings": cfg.to_dict(), "resolved": resolved, "world_size": dist.world_size(),
              **run_metadata(cfg.argv)}
    if dist.is_main():
        run.write_config(config)
    job.tracker = Tracker(cfg.wandb and dist.is_main(), project=cfg.wandb_project, entity=cfg.wandb_entity,
                          name=f"{cfg.model}-{cfg.finetuning_mode}-{task}-{run.hash}", config=config,
                          group=f"{cfg.model}-{cfg.finetuning_mode}", dir=run.dir)
    seed_everything(cfg.seed)
    return job


def mode_context(job: FinetuneJob, *, runs: RunPaths, **fields: Any) -> ModeContext:
    """A :class:`ModeContext` with the mode's settings filled in; ``fields`` give the domain's model parts
    (``model``, ``eligible``, ``dense``, ``forward_fn``, ``calibration_batches``, ``lora_targets`` ...)."""
    cfg, task, tracker = job.cfg, job.cfg.train_dataset, job.tracker
    return ModeContext(
        settings=cfg.mode_settings(), seed=cfg.seed, progress=not cfg.no_progress,
        on_round=lambda r, d, m: tracker.log({"calibration/round": r, "calibration/density": d}),
        load_task_vector=lambda m: runs.task_vectors(cfg, [task], mode=m)[task],
        **fields,
    )


def evaluate(protocol: str, cfg: "Config", *, runs: RunPaths, check_data: Callable[[list[str]], None],
             make_evaluator: Callable[[], "Evaluate"]) -> dict[str, Any]:
    """One protocol for ``--finetuning-mode`` over ``--eval-datasets`` (see :func:`talos.stages.run_protocol`).

    ``check_data(tasks)`` must raise before any model loads when a task's data is missing.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    tasks = list(cfg.eval_datasets)
    check_data(tasks + ([cfg.control_dataset] if protocol == "negation" else []))
    run = runs.evaluation(cfg, protocol)
    return run_protocol(
        protocol, run=run, single_task_run=runs.evaluation(cfg, "single_task"),
        mode=get_mode(cfg.finetuning_mode).results_label(cfg.mode_settings()),
        load_task_vectors=lambda: runs.task_vectors(cfg, tasks),
        make_evaluator=make_evaluator, control=cfg.control_dataset, merge=cfg.merge,
        merge_kwargs=cfg.merge_hparams() if protocol != "single_task" else None, n_points=cfg.n_eval_points,
        threshold=cfg.control_threshold, seed=cfg.seed,
        config={"settings": cfg.to_dict(), **run_metadata(cfg.argv)},
        make_tracker=lambda r: Tracker(cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity,
                                       name=f"{cfg.model}-{cfg.finetuning_mode}-{protocol}-{r.hash}",
                                       config=cfg.to_dict(), dir=r.dir),
        results_json=cfg.results_json,
    )
