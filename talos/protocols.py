"""Evaluation drivers for the three protocols (single task, task addition, task negation).

They never see a model: the domain passes ``evaluate(edit, dataset, split) -> accuracy`` that evaluates
θ0 + ``edit`` (a :class:`TaskVector`, or None for the zero-shot model) on ``dataset``'s ``split``
("val" = the held-out validation split used for choosing coefficients, "test" = the reported split).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

from .merges import merge, negation_edits, normalizer_edits
from .coefficients import (
    choose_addition_coef,
    choose_negation_coef,
    coefficient_grid,
    normalized_accuracy,
    summarize_addition,
    summarize_negation,
)
from .task_vector import TaskVector

logger = logging.getLogger("talos")

Evaluate = Callable[[TaskVector | None, str, str], float]


def single_task(
    evaluate: Evaluate, task_vectors: Mapping[str, TaskVector], splits: Sequence[str] = ("val", "test")
) -> dict[str, dict[str, dict[str, float]]]:
    """Zero-shot and fine-tuned accuracy of each task: ``{split: {"zeroshot": {task: acc}, "finetuned": ...}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in splits:
        out[split] = {"zeroshot": {}, "finetuned": {}}
        for task, tv in task_vectors.items():
            out[split]["zeroshot"][task] = evaluate(None, task, split)
            out[split]["finetuned"][task] = evaluate(tv, task, split)
            logger.info("%s %s: zero-shot %.4f, fine-tuned %.4f", task, split,
                        out[split]["zeroshot"][task], out[split]["finetuned"][task])
    return out


def task_addition(
    evaluate: Evaluate,
    task_vectors: Mapping[str, TaskVector],
    finetuned_acc: Mapping[str, Mapping[str, float]],
    *,
    merge_method: str = "sum",
    merge_kwargs: Mapping[str, Any] | None = None,
    n_points: int = 21,
    on_point: Callable[[float, Mapping[str, float]], None] | None = None,
) -> dict[str, Any]:
    """θ0 + α · merge(τ_1..τ_T): α chosen on the val splits by mean normalised accuracy, reported on test.

    ``finetuned_acc[split][task]`` is the same method's single-task accuracy (normaliser). With
    ``merge_kwargs["variant"] == "official"`` a merge other than ``sum`` is normalised instead by its own
    single-task edits at coefficient 1 (:func:`talos.merges.normalizer_edits`), as the official scripts do.
    """
    tasks = list(task_vectors)
    vectors = {t: task_vectors[t] for t in tasks}
    kw = dict(merge_kwargs or {})
    norm = normalizer_edits(merge_method, vectors, **kw)
    if norm is not None:
        finetuned_acc = {s: {t: evaluate(norm[t], t, s) for t in tasks} for s in ("val", "test")}
    merged = merge(merge_method, vectors, **kw)
    # one merged vector for all tasks, or (TALL-masks) one edit per task, evaluated on that task
    edit_for = (lambda t: merged[t]) if isinstance(merged, dict) else (lambda t: merged)
    curve: dict[float, dict[str, float]] = {}
    for a in coefficient_grid(n_points):
        curve[a] = {t: evaluate(None if a == 0 else edit_for(t) * a, t, "val") for t in tasks}
        if on_point is not None:
            on_point(a, curve[a])
    coef = choose_addition_coef(curve, {t: finetuned_acc["val"][t] for t in tasks})
    test = {t: evaluate(None if coef == 0 else edit_for(t) * coef, t, "test") for t in tasks}
    result = summarize_addition(test, {t: finetuned_acc["test"][t] for t in tasks})
    result["coef"] = coef
    result["val_curve"] = {str(a): v for a, v in curve.items()}
    result["val_normalized_at_coef"] = normalized_accuracy(curve[coef], finetuned_acc["val"])
    result["normalizer"] = "finetuned" if norm is None else "merge_single_task"
    if norm is not None:
        result["normalizer_accuracy"] = {s: dict(finetuned_acc[s]) for s in ("val", "test")}
    return result


def task_negation(
    evaluate: Evaluate,
    task_vectors: Mapping[str, TaskVector],
    control: str,
    *,
    threshold: float = 0.95,
    n_points: int = 21,
    merge_method: str = "sum",
    merge_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per task, θ0 − α τ_t with the α that minimises target val accuracy while the control val accuracy
    stays ≥ ``threshold`` × zero-shot; reports target/control test accuracy averaged over tasks.

    With a merge method other than ``sum``, τ_t is replaced by that method's version of it
    (:func:`talos.merges.negation_edits`: e.g. TIES-trimmed, or the task's TALL-masks edit).
    """
    if merge_method != "sum":
        task_vectors = negation_edits(merge_method, task_vectors, **dict(merge_kwargs or {}))
    zs_control_val = evaluate(None, control, "val")
    per_task: dict[str, tuple[float, float]] = {}
    coefs: dict[str, float] = {}
    for task, tv in task_vectors.items():
        target_acc, control_acc = {}, {}
        for a in coefficient_grid(n_points):
            edit = None if a == 0 else tv * (-a)
            target_acc[a] = evaluate(edit, task, "val")
            control_acc[a] = evaluate(edit, control, "val")
        coef = choose_negation_coef(target_acc, control_acc, zs_control_val, threshold)
        edit = None if coef == 0 else tv * (-coef)
        per_task[task] = (evaluate(edit, task, "test"), evaluate(edit, control, "test"))
        coefs[task] = coef
    result = summarize_negation(per_task)
    result["coef"] = coefs
    result["zeroshot_control_val"] = zs_control_val
    return result
