"""The post-hoc merges exactly as the official TaLoS scripts compute them (``variant="official"``).

The official ``vision/eval_{ties,dare,breadcrumbs,tallmask}_*.py`` and ``nlp/...`` scripts (commit b99d422)
produced the paper's baseline rows; they differ from the method papers' definitions (:mod:`talos.merges`,
``variant="paper"``) in ways that change the numbers. Each function here is a transcription of those rules
onto this project's task vectors; tests compare them with literal transcriptions of the scripts' loops.

Per merge, three edits exist, one per script kind:

* ``addition(vectors)``: the merged vector of ``eval_*_task_addition.py`` (one TaskVector, or one per task);
* ``negation(vectors)``: per task, the vector ``eval_*_task_negation.py`` subtracts;
* ``single(vectors)``: per task, the vector ``eval_*_single_task.py`` evaluates at coefficient 1; its accuracy,
  not the fine-tuned one, is the normaliser of that merge's addition row (``*_ft_accuracies.json``). In every
  official script it equals the negation edit, so ``single`` is ``negation``.

Key filters are substring lists (:func:`talos.merge_common.key_matches`): the vision scripts trim only keys
containing ``attn``, ``mlp`` or ``conv`` in negation and in Breadcrumbs, and DARE leaves
``positional_embedding``, ``text_projection`` and ``logit_scale`` untouched in addition; the nlp scripts apply
every rule to every key. The domains pass these as hyperparameters (``vision/args.py``, ``nlp/args.py``).

The official task vectors also hold the text tower's leftover keys (zero), which enter TIES's global top-k:
``extra_zeros`` counts them without materialising them.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from .merge_common import as_dtype, compute_dtype, fraction, integer, key_matches, real, task_generator, tasks_of
from .task_vector import TaskVector

__all__ = ["OFFICIAL", "OfficialMerge"]

Vectors = Mapping[str, TaskVector]


class OfficialMerge(NamedTuple):
    """The official rules of one merge: addition result, per-task negation edits (= single-task edits)."""

    addition: Callable[..., "TaskVector | dict[str, TaskVector]"]
    negation: Callable[..., dict[str, TaskVector]]


def _prepared(vectors: Vectors) -> tuple[list[str], list[dict[str, torch.Tensor]], list[str]]:
    names, vs, keys = tasks_of(vectors)
    dtype = compute_dtype(vs)
    return names, [{k: as_dtype(v[k], dtype).clone() for k in keys} for v in vs], keys


# ---------------------------------------------------------------------------------------------- TIES
def _ties_threshold(t: Mapping[str, torch.Tensor], k: float, extra_zeros: int) -> float | None:
    """``kthvalue(|τ| over every key, int((1 − k) · N))`` with N counting ``extra_zeros`` zero entries too.

    Entries strictly above it survive (N − int((1 − k)·N) of them when there are no ties). None: keep all
    (the official code would fail on a zero index).
    """
    flat = torch.cat([x.reshape(-1).abs() for x in t.values()])  # (N − extra_zeros,)
    n = flat.numel() + extra_zeros
    drop = int(round(1.0 - k, 12) * n)  # the official literal 0.9 · N for k = 0.1
    idx = drop - extra_zeros  # the zeros are the smallest magnitudes: they fill the first extra_zeros places
    if drop < 1:
        return None
    if idx < 1:
        return 0.0
    return float(torch.kthvalue(flat, idx).values)


def _ties_trim(t: dict[str, torch.Tensor], k: float, extra_zeros: int, keys: str) -> dict[str, torch.Tensor]:
    th = _ties_threshold(t, k, extra_zeros)
    if th is None:
        return t
    return {key: torch.where(x.abs() <= th, 0.0, x) if key_matches(key, keys) else x for key, x in t.items()}


def _ties_check(k: float, extra_zeros: int) -> tuple[float, int]:
    k, extra_zeros = fraction("k", k), integer("extra_zeros", extra_zeros)
    if extra_zeros < 0:
        raise ValueError(f"extra_zeros must be >= 0, got {extra_zeros}")
    return k, extra_zeros


def ties_addition(vectors: Vectors, *, k: float = 0.1, extra_zeros: int = 0, negation_keys: str = "*") -> TaskVector:
    """Global trim of every key (strictly above the threshold survives), sign election by total mass with a
    zero sign replaced by the vector-wide majority sign (+1 unless everything is 0), disjoint mean."""
    k, extra_zeros = _ties_check(k, extra_zeros)
    _, ts, keys = _prepared(vectors)
    ts = [_ties_trim(t, k, extra_zeros, "*") for t in ts]
    with torch.no_grad():
        agg = {key: sum(t[key] for t in ts) for key in keys}
        majority = torch.sign(sum(a.abs().sum() for a in agg.values()))  # the official sign of Σ|agg|
        out = {}
        for key in keys:
            sign = torch.sign(agg[key])
            sign = torch.where(sign == 0, majority, sign)
            picked = [torch.where(torch.where(sign > 0, t[key] > 0, t[key] < 0), t[key], 0.0) for t in ts]
            counts = sum((p != 0).to(p.dtype) for p in picked)
            out[key] = sum(picked) / counts.clamp(min=1)
    return TaskVector(out)


def ties_negation(vectors: Vectors, *, k: float = 0.1, extra_zeros: int = 0,
                  negation_keys: str = "*") -> dict[str, TaskVector]:
    """Per task: the global threshold over every key, applied only to keys matching ``negation_keys``."""
    k, extra_zeros = _ties_check(k, extra_zeros)
    names, ts, _ = _prepared(vectors)
    return {n: TaskVector(_ties_trim(t, k, extra_zeros, negation_keys)) for n, t in zip(names, ts)}


# ---------------------------------------------------------------------------------------------- DARE
def _dare_tensor(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Keep exactly numel − int(p · numel) random entries, rescaled by 1/(1 − p) (official: random normal
    scores, entries above the int(p·numel)-th smallest survive)."""
    drop = int(p * x.numel())
    if drop < 1:
        return x / (1.0 - p)
    score = torch.randn(x.shape, generator=g, dtype=torch.float32).reshape(-1)  # (numel,), CPU draws
    th = torch.kthvalue(score, drop).values
    keep = (score > th).reshape(x.shape).to(x.device)
    return torch.where(keep, x / (1.0 - p), 0.0)


def _dare_check(p: float, seed: int) -> tuple[float, int]:
    p = real("p", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    return p, integer("seed", seed)


def _dare_each(vectors: Vectors, p: float, seed: int, touch: Callable[[str], bool]) -> dict[str, TaskVector]:
    names, ts, keys = _prepared(vectors)
    out = {}
    with torch.no_grad():
        for n, t in zip(names, ts):
            g = task_generator(seed, n)
            out[n] = TaskVector({key: _dare_tensor(t[key], p, g) if touch(key) else t[key] for key in keys})
    return out


def dare_addition(vectors: Vectors, *, p: float = 0.9, seed: int = 0, skip_keys: str = "",
                  negation_keys: str = "*") -> TaskVector:
    """Per task and tensor, an exact random subset (keys matching ``skip_keys`` untouched), then the sum."""
    p, seed = _dare_check(p, seed)
    each = _dare_each(vectors, p, seed, lambda key: not key_matches(key, skip_keys))
    vs = list(each.values())
    return sum(vs[1:], vs[0])


def dare_negation(vectors: Vectors, *, p: float = 0.9, seed: int = 0, skip_keys: str = "",
                  negation_keys: str = "*") -> dict[str, TaskVector]:
    """Per task: the exact random subset on keys matching ``negation_keys`` only."""
    p, seed = _dare_check(p, seed)
    return _dare_each(vectors, p, seed, lambda key: key_matches(key, negation_keys))


# ---------------------------------------------------------------------------------------------- Breadcrumbs
def _breadcrumbs_tensor(x: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Rows along the LAST dimension: zero the top int(β·C) by magnitude, then keep the top int(γ·C) of the rest."""
    c = x.shape[-1] if x.dim() else 1
    y = x.reshape(-1, c)  # (R, C)
    drop, keep = int(c * beta), int(c * gamma)
    if drop:
        y = y.scatter(1, torch.topk(y.abs(), drop, dim=1).indices, 0.0)
    mask = torch.zeros_like(y, dtype=torch.bool)
    if keep:
        mask.scatter_(1, torch.topk(y.abs(), keep, dim=1).indices, True)
    return torch.where(mask, y, 0.0).reshape(x.shape)


def _breadcrumbs_check(beta: float, gamma: float) -> tuple[float, float]:
    beta = real("beta", beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return beta, fraction("gamma", gamma)


def breadcrumbs_negation(vectors: Vectors, *, beta: float = 0.1, gamma: float = 0.2,
                         trim_keys: str = "*") -> dict[str, TaskVector]:
    """Per task: keys matching ``trim_keys`` trimmed row by row, the others untouched."""
    beta, gamma = _breadcrumbs_check(beta, gamma)
    names, ts, keys = _prepared(vectors)
    with torch.no_grad():
        return {n: TaskVector({key: _breadcrumbs_tensor(t[key], beta, gamma) if key_matches(key, trim_keys)
                               else t[key] for key in keys}) for n, t in zip(names, ts)}


def breadcrumbs_addition(vectors: Vectors, *, beta: float = 0.1, gamma: float = 0.2,
                         trim_keys: str = "*") -> TaskVector:
    """The sum of the per-task trimmed vectors."""
    vs = list(breadcrumbs_negation(vectors, beta=beta, gamma=gamma, trim_keys=trim_keys).values())
    return sum(vs[1:], vs[0])


# ---------------------------------------------------------------------------------------------- TALL-masks
def _tall_masks(ts: list[dict[str, torch.Tensor]], keys: list[str], lam: float) -> list[dict[str, torch.Tensor]]:
    """m_t = |τ_t| > λ · (τ_MTL − τ_t): strict, and no absolute value on the right (official)."""
    lam = real("lam", lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    mtl = {key: sum(t[key] for t in ts) for key in keys}
    return [{key: t[key].abs() > (mtl[key] - t[key]) * lam for key in keys} for t in ts]


def tall_masks_negation(vectors: Vectors, *, lam: float = 0.2) -> dict[str, TaskVector]:
    """Per task: m_t ⊙ τ_t (also the official TALL-masks addition edit and single-task normaliser)."""
    names, ts, keys = _prepared(vectors)
    with torch.no_grad():
        masks = _tall_masks(ts, keys, lam)
        return {n: TaskVector({key: torch.where(m[key], t[key], 0.0) for key in keys})
                for n, t, m in zip(names, ts, masks)}


def consensus_addition(vectors: Vectors, *, k: int = 2, lam: float = 0.2) -> TaskVector:
    """Σ_t τ_t ⊙ consensus ⊙ m_last, consensus = (Σ_t m_t ≥ k): the official script multiplies by the mask
    left in its loop variable, the LAST task's TALL mask (task order of ``vectors``)."""
    k = integer("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    _, ts, keys = _prepared(vectors)
    with torch.no_grad():
        masks = _tall_masks(ts, keys, lam)
        out = {}
        for key in keys:
            keep = (sum(m[key].to(torch.int64) for m in masks) >= k) & masks[-1][key]
            out[key] = torch.where(keep, sum(t[key] for t in ts), 0.0)
    return TaskVector(out)


def consensus_negation(vectors: Vectors, *, k: int = 2, lam: float = 0.2) -> dict[str, TaskVector]:
    """The official TALL-mask / Consensus negation script: m_t ⊙ τ_t (``k`` plays no part)."""
    k = integer("k", k)
    return tall_masks_negation(vectors, lam=lam)


#: merge name -> its official rules (the ``sum`` of task arithmetic has no variant).
OFFICIAL: dict[str, OfficialMerge] = {
    "ties": OfficialMerge(ties_addition, ties_negation),
    "dare": OfficialMerge(dare_addition, dare_negation),
    "breadcrumbs": OfficialMerge(breadcrumbs_addition, breadcrumbs_negation),
    "tall_masks": OfficialMerge(tall_masks_negation, tall_masks_negation),
    "consensus": OfficialMerge(consensus_addition, consensus_negation),
}
