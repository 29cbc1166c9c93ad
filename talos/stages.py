"""The stages of fine-tuning and evaluation, the same for every domain (``vision/`` and ``nlp/`` run on them).

A domain adapter builds its model, data, ``ModeContext`` and run paths; these functions do the rest the same
way for every domain:

* :func:`finetune_with_mode`: masks (loaded or computed and saved), the mode's training state, the shared
  training loop with resume, then ``finetuned.safetensors``, the task vector and ``metrics.json`` (written
  last: it marks the run complete);
* :class:`ParameterEditor` / :class:`EditEvaluator`: ``evaluate(edit, task, split)`` on a live model (θ0 + edit,
  optionally through the linearized model), zero-shot results cached;
* :func:`run_protocol`: one evaluation protocol with its skip-when-done run folder, wandb tracker and
  ``--results-json`` export (:func:`export_results`, the shared schema of :mod:`talos.report`).

The scripts' command-line glue over these stages lives in :mod:`talos.app.jobs`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed as dist
from . import protocols
from .calibration import format_mask_report, mask_report
from .io import (RunLock, atomic_write_json, check_artifact, forget_artifact, load_tensors, read_json,
                 record_artifact, save_tensors)
from .modes import FinetuneMode, ModeContext
from .paths import EvalRun, FinetuneRun
from .report import update_results
from .runinfo import seed_everything
from .task_vector import TaskVector
from .tracking import Tracker
from .train import DivergenceError, TrainConfig, train

if TYPE_CHECKING:
    from .analysis.drift import GradientDrift

logger = logging.getLogger("talos")

__all__ = ["PROTOCOLS", "finetune_with_mode", "ParameterEditor", "EditEvaluator", "run_protocol", "export_results",
           "per_task_table", "run_complete", "hold_run_lock", "release_run_lock", "check_finite_task_vector"]

PROTOCOLS = ("single_task", "addition", "negation")


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------------
def finetune_with_mode(
    *,
    run: FinetuneRun,
    mode: FinetuneMode,
    ctx: ModeContext,
    train_set: torch.utils.data.Dataset,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    cfg: TrainConfig,
    device: torch.device | str,
    collate_fn: Callable | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    gradient_drift: GradientDrift | None = None,
) -> dict[str, Any]:
    """Masks -> mode.prepare -> train (resuming from ``run.checkpoint``) -> artifacts; returns the metrics.

    ``ctx.model`` must hold θ0 in ``ctx.eligible`` + ``ctx.dense`` when called. Returns the training summary
    with ``interrupted=True`` (and writes no artifact but the checkpoint) when ``stop_after`` stops it early.
    Under ``torchrun`` every rank trains (DDP) and computes the same masks; only rank 0 writes files.
    ``gradient_drift`` (a :class:`talos.analysis.GradientDrift`) records Fig. 7's drift into the run folder.
    """
    tracker = tracker or Tracker(False)
    hold_run_lock(run)  # reentrant: start_finetune usually took it already
    try:
        return _finetune_locked(run=run, mode=mode, ctx=ctx, train_set=train_set, loss_fn=loss_fn, cfg=cfg,
                                device=device, collate_fn=collate_fn, tracker=tracker, progress=progress,
                                stop_after=stop_after, gradient_drift=gradient_drift)
    finally:
        release_run_lock(run)


def _finetune_locked(*, run: FinetuneRun, mode: FinetuneMode, ctx: ModeContext, train_set: Any, loss_fn: Any,
                     cfg: TrainConfig, device: Any, collate_fn: Any, tracker: Tracker, progress: bool,
                     stop_after: int | None, gradient_drift: GradientDrift | None = None) -> dict[str, Any]:
    masks = None
    if mode.sparse:
        bad = check_artifact(run.mask) if run.mask.exists() else "missing"
        if bad is None:
            masks = load_tensors(run.mask)
            logger.info("loaded mask from %s", run.mask)
        else:
            if bad != "missing":
                logger.warning("recomputing the mask: %s is not trusted (%s)", run.mask, bad)
            masks = mode.masks(ctx)  # identical on every rank (Fisher sums are all-reduced)
            if dist.is_main():
                _save_artifact(run.mask, lambda p: save_tensors(p, masks))
                _save_artifact(run.calibration, lambda p: atomic_write_json(p, {"per_tensor": mask_report(masks)}))
                logger.info("mask saved to %s\n%s", run.mask, format_mask_report(masks))
    named = dict(ctx.model.named_parameters())
    theta0 = {n: named[n].detach().cpu().clone() for n in list(ctx.eligible) + list(ctx.dense)}
    state = mode.prepare(ctx, masks)
    try:
        on_step = gradient_drift.start(state.model, state.named_params, state.masks) if gradient_drift else None
        summary = train(state.model, train_set, loss_fn, state.named_params, state.masks, cfg, dense=state.dense,
                        device=device, checkpoint_path=run.checkpoint, collate_fn=collate_fn,
                        on_log=lambda s, m: tracker.log(m, step=s), progress=progress, stop_after=stop_after,
                        on_step=on_step)
        if summary.get("interrupted"):
            return summary
        tv = state.task_vector()
        check_finite_task_vector(tv, run.task_vector)  # never written: the run stays incomplete
    finally:
        state.cleanup()
    trainable = sum(p.numel() if state.masks is None or n not in state.masks else int(state.masks[n].sum())
                    for n, p in state.named_params)
    metrics = {**summary, "task_vector_density": tv.density(), "task_vector_norm": tv.norm(),
               "trainable_entries": int(trainable)}
    if dist.is_main():  # only rank 0 writes artifacts
        _save_artifact(run.finetuned, lambda p: save_tensors(p, tv.apply_to({n: theta0[n] for n in tv.keys()})))
        _save_artifact(run.task_vector, tv.save)
        if gradient_drift is not None:
            from .analysis.drift import drift_path

            _save_artifact(drift_path(run.dir), lambda p: atomic_write_json(p, gradient_drift.result()))
        _save_artifact(run.metrics, lambda p: atomic_write_json(p, metrics))  # last: marks the run complete
        forget_artifact(run.checkpoint)
        run.checkpoint.unlink(missing_ok=True)
        tracker.summary(metrics)
        logger.info("done: %s (%d steps, loss %.4f, task-vector density %.4f)", run.dir, summary["steps"],
                    summary["loss"], metrics["task_vector_density"])
    dist.barrier()
    return metrics


def _save_artifact(path: Any, write: Callable[[Any], None]) -> None:
    """Write an artifact (atomically, by ``write(path)``) and list its size and hash in the manifest; the
    entry is dropped first so a kill between the two leaves the file untrusted, never trusted and stale."""
    forget_artifact(path)
    write(path)
    record_artifact(path)


def _trusted(path: Any) -> bool:
    """An evaluation's results file exists and matches its manifest (folders without one: readable JSON)."""
    if not path.exists():
        return False
    bad = check_artifact(path, legacy_ok=True)
    if bad is None:
        try:
            read_json(path)
            return True
        except ValueError as e:
            bad = str(e)
    logger.warning("recomputing %s (%s)", path, bad)
    return False


def check_finite_task_vector(tv: TaskVector, path: Any) -> None:
    """DivergenceError when ``tv`` holds NaN or inf (a diverged run or a damaged file), naming ``path``."""
    bad = [n for n in tv.keys() if tv[n].is_floating_point() and not bool(torch.isfinite(tv[n]).all())]
    if bad:
        raise DivergenceError(f"task vector {path} has non-finite entries in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                              "the fine-tuning diverged or the file is damaged: rerun fine-tuning with a lower --lr")


def run_complete(run: FinetuneRun) -> str | None:
    """None when every final artifact of ``run`` matches its manifest, else the first problem found."""
    for p in (run.metrics, run.task_vector, run.finetuned):
        bad = check_artifact(p)
        if bad is not None:
            return f"{p.name}: {bad}"
    return None


_LOCKS: dict[str, Any] = {}


def hold_run_lock(run: FinetuneRun) -> Any:
    """This process's lock on ``run.dir`` (taken now unless already held); RuntimeError naming the PID that
    holds it otherwise. Only the main rank locks (torchrun ranks share the folder)."""
    key = str(run.dir)
    if not dist.is_main() or key in _LOCKS:
        return None
    _LOCKS[key] = RunLock(run.dir)
    return _LOCKS[key]


def release_run_lock(run: FinetuneRun) -> None:
    """Release the lock of ``run.dir`` taken by :func:`hold_run_lock` (no-op when not held)."""
    held = _LOCKS.pop(str(run.dir), None)
    if held is not None:
        held.release()


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
class ParameterEditor:
    """Writes θ0 + edit into a live model. θ0 of ``names`` is copied (to the CPU) at construction."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        named = dict(model.named_parameters())
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"unknown parameter names: {missing[:5]}")
        self.theta0 = {n: named[n].detach().cpu().clone() for n in names}

    @torch.no_grad()
    def apply(self, edit: TaskVector | None) -> None:
        """Set the edited parameters to θ0, then add ``edit`` (None = the pre-trained model)."""
        named = dict(self.model.named_parameters())
        for n, v in self.theta0.items():
            named[n].copy_(v)
        if edit is not None:
            for n in edit.keys():
                if n not in self.theta0:
                    raise ValueError(f"task vector entry {n!r} is not an edited parameter of this model")
                named[n].add_(edit[n].to(named[n].device, named[n].dtype))


class EditEvaluator:
    """``evaluate(edit, task, split) -> accuracy`` (talos.protocols' interface) on top of a live model.

    ``accuracy(model, task, split)`` evaluates whatever module it is given: the model itself, or with
    ``linearized`` its first-order Taylor expansion around θ0 (linear FT, post-hoc). Zero-shot
    results (edit None) are computed once per (task, split).
    """

    def __init__(self, model: nn.Module, names: Sequence[str],
                 accuracy: Callable[[nn.Module, str, str], float], linearized: bool = False) -> None:
        from .linearize import LinearizedModel

        self.editor = ParameterEditor(model, names)
        self.model = model
        self.accuracy = accuracy
        self.eval_model = LinearizedModel(model, list(names)) if linearized else model
        self._zs: dict[tuple[str, str], float] = {}

    def __call__(self, edit: TaskVector | None, task: str, split: str) -> float:
        if edit is None and (task, split) in self._zs:
            return self._zs[(task, split)]
        self.editor.apply(edit)
        self.eval_model.eval()
        acc = float(self.accuracy(self.eval_model, task, split))
        if edit is None:
            self._zs[(task, split)] = acc
        return acc


def export_results(path: str, protocol: str, mode: str, result: Mapping[str, Any], merge: str = "sum") -> None:
    """Merge one protocol's result into the shared results.json (schema in :mod:`talos.report`)."""
    if protocol == "single_task":
        update_results(path, "single_task", mode, result["test"]["finetuned"])
        update_results(path, "single_task", "zeroshot", result["test"]["zeroshot"])
        update_results(path, "task_vector_density", mode, result["task_vector_density"])
    elif protocol == "addition":
        row = {k: result[k] for k in ("absolute", "normalized", "coef")}
        if merge == "sum":
            update_results(path, "addition", mode, row)
        if merge != "sum" or mode == "standard" or mode.startswith("imported:"):  # every mode x merge lands
            update_results(path, "merges", merge if mode == "standard" else f"{merge} ({mode})", row)
    elif protocol == "negation":
        row = {k: result[k] for k in ("target", "control", "coef")}
        if merge == "sum":
            update_results(path, "negation", mode, row)
        if merge != "sum" or mode == "standard" or mode.startswith("imported:"):
            update_results(path, "negation_merges", merge if mode == "standard" else f"{merge} ({mode})", row)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")


def per_task_table(protocol: str, result: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a protocol's per-task results, for wandb tables and reports."""
    if protocol == "single_task":
        return (["task", "split", "zeroshot", "finetuned"],
                [[t, split, result[split]["zeroshot"][t], result[split]["finetuned"][t]]
                 for split in result if isinstance(result[split], dict) and "zeroshot" in result[split]
                 for t in result[split]["zeroshot"]])
    if protocol == "addition":
        coef = result["coef"]
        return (["task", "absolute", "normalized", "coef"],
                [[t, r["absolute"], r["normalized"], coef[t] if isinstance(coef, dict) else coef]
                 for t, r in result["per_task"].items()])
    if protocol == "negation":
        return (["task", "target", "control", "coef"],
                [[t, r["target"], r["control"], result["coef"][t]] for t, r in result["per_task"].items()])
    raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")


def _single_task(ev: protocols.Evaluate, tvs: Mapping[str, TaskVector], run: EvalRun) -> dict[str, Any]:
    """Single-task results, read from their run folder when single-task evaluation already ran."""
    if _trusted(run.results):
        return read_json(run.results)
    res = protocols.single_task(ev, tvs)
    res["task_vector_density"] = {t: tv.density() for t, tv in tvs.items()}
    if dist.is_main():
        _save_artifact(run.results, lambda p: atomic_write_json(p, res))
    dist.barrier()
    return res


def run_protocol(
    protocol: str,
    *,
    run: EvalRun,
    single_task_run: EvalRun,
    mode: str,
    load_task_vectors: Callable[[], dict[str, TaskVector]],
    make_evaluator: Callable[[], protocols.Evaluate],
    control: str | None = None,
    merge: str = "sum",
    merge_kwargs: Mapping[str, Any] | None = None,
    n_points: int = 21,
    threshold: float = 0.95,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    make_tracker: Callable[[EvalRun], Tracker] | None = None,
    results_json: str | None = None,
) -> dict[str, Any]:
    """Run (or skip, when ``run.results`` exists) one protocol; returns its results.

    ``load_task_vectors`` is called before ``make_evaluator`` so a missing task vector fails before the model
    loads. Addition normalises by the same mode's single-task accuracy, read from (or computed into)
    ``single_task_run``. Under ``torchrun`` the evaluator is expected to shard its data (every rank returns
    the same accuracy); only rank 0 writes files, logs to wandb and exports.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    if protocol == "negation" and not control:
        raise ValueError("the negation protocol needs a control task")
    if _trusted(run.results):
        logger.info("skip: %s results exist (%s)", protocol, run.results)
        result = read_json(run.results)
    else:
        seed_everything(seed)
        tvs = load_task_vectors()
        if dist.is_main():
            run.write_config(dict(config or {}))
        tracker = make_tracker(run) if make_tracker is not None and dist.is_main() else Tracker(False)
        ev = make_evaluator()
        if protocol == "single_task":
            result = _single_task(ev, tvs, run)
        elif protocol == "addition":
            st = _single_task(ev, tvs, single_task_run)
            result = protocols.task_addition(
                ev, tvs, {"val": st["val"]["finetuned"], "test": st["test"]["finetuned"]}, merge_method=merge,
                merge_kwargs=merge_kwargs, n_points=n_points,
                on_point=lambda a, accs: tracker.log({f"addition/val/{t}": v for t, v in accs.items()}))
        else:
            result = protocols.task_negation(ev, tvs, control, threshold=threshold, n_points=n_points,
                                              merge_method=merge, merge_kwargs=merge_kwargs)
        if dist.is_main():
            _save_artifact(run.results, lambda p: atomic_write_json(p, result))
        dist.barrier()
        tracker.summary({f"{protocol}/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        tracker.table(f"{protocol}/per_task", *per_task_table(protocol, result))
        tracker.finish()
    if results_json and dist.is_main():
        export_results(results_json, protocol, mode, result, merge=merge)
    logger.info("%s: %s", protocol, {k: v for k, v in result.items() if isinstance(v, (int, float))})
    return result
