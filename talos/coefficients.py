"""Coefficient math of task arithmetic: coefficient grids and their selection, summaries, disentanglement error."""
from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "choose_addition_coef",
    "choose_negation_coef",
    "coefficient_grid",
    "disentanglement_error",
    "normalized_accuracy",
    "summarize_addition",
    "summarize_negation",
]

# Two scores closer than this count as a tie. Means of normalised accuracies are
# computed with float division, so mathematically equal scores (e.g. 0.3/0.6 and
# 0.5/1.0) can differ in the last bit; without a tolerance the tie-break rule
# ("smallest α wins") would silently depend on rounding.
_TIE_TOL = 1e-12


def coefficient_grid(n_points: int = 21, max_coef: float = 1.0) -> list[float]:
    """Evenly spaced scaling coefficients ``[0, max_coef]`` (21 points -> 0.0, 0.05, ..., 1.0)."""
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an int >= 2, got {n_points!r}")
    # Rounding makes the grid exact decimals (0.15, not 0.15000000000000002), so the
    # values can be used as dictionary keys and compared with literals.
    return [round(i * max_coef / (n_points - 1), 10) for i in range(n_points)]


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of positions where ``pred`` equals ``target`` (both class-index tensors of one shape)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("accuracy of an empty prediction is undefined")
    return (pred == target).float().mean().item()


def normalized_accuracy(merged: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, float]:
    """Per task, merged-model accuracy divided by the same method's single-task fine-tuned accuracy."""
    if not merged:
        raise ValueError("no tasks given")
    out: dict[str, float] = {}
    for task, acc in merged.items():
        if task not in finetuned:
            raise ValueError(f"no fine-tuned accuracy for task {task!r}")
        ref = float(finetuned[task])
        if not ref > 0:  # also rejects NaN
            raise ValueError(f"fine-tuned accuracy for task {task!r} must be positive, got {ref}")
        out[task] = float(acc) / ref
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _sorted_coefs(keys: Sequence[Hashable], what: str) -> list[float]:
    if not keys:
        raise ValueError(f"{what} is empty")
    return sorted(keys)  # type: ignore[type-var]


def choose_addition_coef(
    val_acc: Mapping[float, Mapping[str, float]], finetuned_val_acc: Mapping[str, float]
) -> float:
    """Pick α for task addition θ0 + α Σ τ_t by the best mean *normalised* validation accuracy.

    ``val_acc[α][task]`` is the merged model's validation accuracy. Normalising by each
    task's fine-tuned accuracy keeps easy tasks from dominating the choice. Ties (within
    1e-12) go to the smallest α, i.e. the model closest to the pre-trained one.
    """
    coefs = _sorted_coefs(list(val_acc), "val_acc")
    if not finetuned_val_acc:
        raise ValueError("finetuned_val_acc is empty")
    tasks = set(finetuned_val_acc)
    best_coef, best_score = None, -float("inf")
    for coef in coefs:
        row = val_acc[coef]
        # Every α must be scored on the same tasks, otherwise the means are not comparable.
        if set(row) != tasks:
            missing = sorted(tasks - set(row))
            extra = sorted(set(row) - tasks)
            raise ValueError(f"tasks at alpha={coef} do not match fine-tuned tasks (missing {missing}, extra {extra})")
        norm = normalized_accuracy(row, finetuned_val_acc)
        score = _mean([norm[t] for t in sorted(norm)])  # fixed order -> reproducible rounding
        if score > best_score + _TIE_TOL:
            best_coef, best_score = coef, score
    if best_coef is None:  # only reachable with NaN scores
        raise ValueError("no valid coefficient: all scores are NaN")
    return float(best_coef)


def choose_negation_coef(
    target_acc: Mapping[float, float],
    control_acc: Mapping[float, float],
    zeroshot_control_acc: float,
    threshold: float = 0.95,
) -> float:
    """Pick α for task negation θ0 − α τ_t: lowest target accuracy with control >= threshold·zero-shot.

    Both mappings are validation accuracies keyed by α. Ties on target accuracy (within
    1e-12) go to the smallest α. α = 0 is the zero-shot model itself, so it normally
    satisfies the constraint; if no α does, a ValueError is raised.
    """
    if set(target_acc) != set(control_acc):
        raise ValueError(
            f"target_acc and control_acc must have the same alphas, got {sorted(target_acc)} and {sorted(control_acc)}"
        )
    coefs = _sorted_coefs(list(target_acc), "target_acc")
    floor = threshold * float(zeroshot_control_acc)
    best_coef, best_target = None, float("inf")
    for coef in coefs:
        if not control_acc[coef] >= floor:
            continue
        target = float(target_acc[coef])
        if best_coef is None or target < best_target - _TIE_TOL:
            best_coef, best_target = coef, target
    if best_coef is None:
        raise ValueError(
            f"no alpha keeps control accuracy >= {threshold} * zero-shot ({zeroshot_control_acc}) = {floor}; "
            f"best control accuracy was {max(control_acc.values())} (alpha = 0 should be the zero-shot model)"
        )
    return float(best_coef)


def summarize_addition(test_acc: Mapping[str, float], finetuned_test_acc: Mapping[str, float]) -> dict:
    """Mean absolute and mean normalised test accuracy of a merged model, plus the per-task values."""
    norm = normalized_accuracy(test_acc, finetuned_test_acc)
    tasks = sorted(test_acc)
    return {
        "absolute": _mean([float(test_acc[t]) for t in tasks]),
        "normalized": _mean([norm[t] for t in tasks]),
        "per_task": {t: {"absolute": float(test_acc[t]), "normalized": norm[t]} for t in tasks},
    }


def summarize_negation(per_task: Mapping[str, tuple[float, float]]) -> dict:
    """Mean target and control test accuracy over negated tasks; ``per_task[t] = (target, control)``."""
    if not per_task:
        raise ValueError("no tasks given")
    tasks = sorted(per_task)
    rows = {}
    for t in tasks:
        pair = tuple(per_task[t])
        if len(pair) != 2:
            raise ValueError(f"per_task[{t!r}] must be (target_acc, control_acc), got {per_task[t]!r}")
        rows[t] = {"target": float(pair[0]), "control": float(pair[1])}
    return {
        "target": _mean([rows[t]["target"] for t in tasks]),
        "control": _mean([rows[t]["control"] for t in tasks]),
        "per_task": rows,
    }


def disentanglement_error(
    predict: Callable[[float, float, int], Tensor],
    alphas1: Sequence[float],
    alphas2: Sequence[float],
) -> Tensor:
    """Weight-disentanglement error ξ(α1, α2) of Ortiz-Jimenez et al. (2023) on a grid, in [0, 2].

    ``predict(a1, a2, t)`` gives the class indices of θ0 + a1 τ1 + a2 τ2 on task t's data.
    ξ sums over both tasks the fraction of examples whose prediction under the joint edit
    differs from the single-task edit (``predict(a1, 0, 0)`` / ``predict(0, a2, 1)``).
    Returns a float tensor of shape [len(alphas1), len(alphas2)].
    """
    alphas1 = [float(a) for a in alphas1]
    alphas2 = [float(a) for a in alphas2]
    if not alphas1 or not alphas2:
        raise ValueError("alphas1 and alphas2 must be non-empty")

    # predict runs a model over a data set; single-task references are reused across a
    # whole row/column of the grid and the joint model at a2=0 (a1=0) *is* the task-0
    # (task-1) reference, so each distinct (a1, a2, t) is evaluated once.
    cache: dict[tuple[float, float, int], Tensor] = {}

    def cached(a1: float, a2: float, t: int) -> Tensor:
        key = (a1 + 0.0, a2 + 0.0, t)  # +0.0 folds -0.0 into 0.0
        if key not in cache:
            cache[key] = torch.as_tensor(predict(a1, a2, t))
        return cache[key]

    def disagreement(ref: Tensor, joint: Tensor, t: int) -> float:
        if ref.shape != joint.shape or ref.ndim != 1 or ref.numel() == 0:
            raise ValueError(
                f"predict must return non-empty 1-D class indices of a fixed length for task {t}, "
                f"got shapes {tuple(ref.shape)} and {tuple(joint.shape)}"
            )
        return (ref != joint).float().mean().item()

    xi = torch.zeros(len(alphas1), len(alphas2))
    for i, a1 in enumerate(alphas1):
        for j, a2 in enumerate(alphas2):
            err0 = disagreement(cached(a1, 0.0, 0), cached(a1, a2, 0), 0)
            err1 = disagreement(cached(0.0, a2, 1), cached(a1, a2, 1), 1)
            xi[i, j] = err0 + err1
    return xi
