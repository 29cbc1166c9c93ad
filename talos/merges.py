"""Merge methods that combine several task vectors into one (``--merge``); one registry entry per method.

Two variants of every method: ``variant="paper"`` (this module, the library default) follows the method papers'
definitions below; ``variant="official"`` (:mod:`talos.official_merges`, the scripts' default
``--merge-variant``) reproduces the official TaLoS scripts that produced the paper's baseline rows, which
differ in ways that change the numbers (that module lists them). Registered methods (paper hyperparameters
and defaults from :func:`hparams_of`, read from each function's keyword-only parameters):

* ``sum``          task arithmetic, Σ_t τ_t.
* ``ties``         TIES-Merging (Yadav et al., 2023): global top-k trim, sign election, disjoint mean.
* ``dare``         DARE (Yu et al., 2024): random drop with probability p, rescale by 1/(1−p), sum.
* ``breadcrumbs``  Model Breadcrumbs (Davari & Belilovsky, 2024): per row, drop the top-β outliers,
                   keep the next γ fraction by magnitude, sum.
* ``tall_masks``   TALL-masks (Wang et al., 2024): one edit per task, m_t ⊙ τ_MTL (returns a dict).
* ``consensus``    Consensus Task Arithmetic (same paper): τ_MTL on coordinates kept by ≥ k TALL masks.

Task negation with a merge (:func:`negation_edits`) subtracts, per task, the merge's version of that task's
vector: the task's own edit for per-task methods (TALL-masks), the method applied to that vector alone for
the others (TIES trims it, DARE drops and rescales, Breadcrumbs keeps its band, ``sum`` leaves it), and for
Consensus the vector on the coordinates that the consensus of all tasks selects.

Every method takes ``vectors: Mapping[task, TaskVector]`` (identical keys and shapes) and keyword-only
hyperparameters, never modifies its inputs, and computes in float32 (float64 when any input tensor is
float64); its outputs are in that dtype, except ``sum`` which keeps TaskVector addition's dtype rules.
Work is done one parameter tensor at a time; only TIES's global threshold looks at a whole vector.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch

from .merge_common import as_dtype, compute_dtype, count, fraction, integer, real, task_generator, tasks_of
from .registry import Registry
from .task_vector import TaskVector

__all__ = [
    "MERGES",
    "all_hparams",
    "hparams_of",
    "MergeFn",
    "merge",
    "merge_sum",
    "merge_ties",
    "merge_dare",
    "merge_breadcrumbs",
    "merge_tall_masks",
    "merge_consensus",
    "negation_edits",
]

MergeFn = Callable[..., "TaskVector | dict[str, TaskVector]"]

#: name -> ``merge(vectors: Mapping[task, TaskVector], **hparams)`` returning one merged TaskVector, or a dict
#: task -> TaskVector when the method builds one edit per task (TALL-masks). The protocols then scale the
#: result by one coefficient chosen on validation data (θ0 + α · merged).
MERGES: Registry[MergeFn] = Registry("merge method")
#: methods that return one edit per task (a dict), evaluated each on its own task.
PER_TASK = {"tall_masks"}


# ---------------------------------------------------------------------------------------------- sum
@MERGES.register("sum")
def merge_sum(vectors: Mapping[str, TaskVector]) -> TaskVector:
    """Task arithmetic: the plain sum of the task vectors."""
    _, vs, _ = tasks_of(vectors)
    return sum(vs[1:], vs[0])


# ---------------------------------------------------------------------------------------------- TIES
def _global_topk_threshold(v: TaskVector, keys: list[str], k: float, dtype: torch.dtype) -> float | None:
    """The magnitude of the ⌊k·N⌋-th largest entry (at least the largest) over all N entries of ``v``.

    Memory: one flat buffer of N magnitudes (filled slice by slice, no list of copies), then kthvalue.
    Returns None for an empty vector.
    """
    n = sum(v[key].numel() for key in keys)
    if n == 0:
        return None
    first = next(t for t in v.vector.values() if t.numel())
    mags = torch.empty(n, dtype=dtype, device=first.device)  # (N,)
    pos = 0
    for key in keys:
        t = v[key]
        mags[pos : pos + t.numel()] = as_dtype(t, dtype).reshape(-1).abs().to(mags.device)
        pos += t.numel()
    n_keep = max(1, count(k, n))
    # kthvalue is 1-based from the smallest: the n_keep-th largest is the (n - n_keep + 1)-th smallest.
    return float(torch.kthvalue(mags, n - n_keep + 1).values)


@MERGES.register("ties")
def merge_ties(vectors: Mapping[str, TaskVector], *, k: float = 0.1) -> TaskVector:
    """TIES-Merging: trim, elect sign, disjoint mean.

    1. Trim: per task, keep the entries whose magnitude is at least that of the ⌊k·N⌋-th largest over the
       WHOLE flattened task vector (N entries, all tensors together), as the TIES authors' code does
       (``topk_values_mask`` over the flattened vector); entries tied at the threshold are all kept.
    2. Elect: per entry, γ = sign(Σ_t trimmed_t) (sign of the total mass).
    3. Disjoint mean: per entry, the mean of the trimmed values that are nonzero and have sign γ;
       0 where no task agrees. An exact tie (Σ = 0) elects sign 0, so the entry is 0, as in the paper's
       Algorithm 1; the official TaLoS scripts' rule (0 becomes the vector-wide majority sign, +) is
       ``variant="official"``.
    """
    k = fraction("k", k)
    _, vs, keys = tasks_of(vectors)
    dtype = compute_dtype(vs)
    thresholds = [_global_topk_threshold(v, keys, k, dtype) for v in vs]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in keys:
            trimmed = torch.stack(
                [torch.where(as_dtype(v[key], dtype).abs() >= th, as_dtype(v[key], dtype), 0.0) for v, th in zip(vs, thresholds)]
            )  # (T, *shape)
            elected = torch.sign(trimmed.sum(0))  # (*shape), in {-1, 0, 1}
            agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (T, *shape)
            total = torch.where(agree, trimmed, 0.0).sum(0)
            count = agree.sum(0).clamp(min=1)  # entries with no agreeing task: 0 / 1 = 0
            out[key] = total / count.to(dtype)
    return TaskVector(out)


# ---------------------------------------------------------------------------------------------- DARE
@MERGES.register("dare")
def merge_dare(vectors: Mapping[str, TaskVector], *, p: float = 0.9, seed: int = 0) -> TaskVector:
    """DARE: per task, drop each entry with probability ``p``, rescale survivors by 1/(1−p), then sum.

    Deterministic: each task draws from its own ``torch.Generator`` seeded from ``seed`` and the task
    name, over tensors in key order. Uniforms are drawn on the CPU and moved to the tensor's device, so
    the masks are the same on every device. ``p = 0`` reproduces ``sum`` exactly.
    """
    p = real("p", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    seed = integer("seed", seed)
    names, vs, keys = tasks_of(vectors)
    dtype = compute_dtype(vs)
    gens = [task_generator(seed, n) for n in names]
    scale = 1.0 / (1.0 - p)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in keys:
            acc: torch.Tensor | None = None
            for v, g in zip(vs, gens):
                t = as_dtype(v[key], dtype)
                u = torch.rand(t.shape, generator=g, dtype=dtype).to(t.device)  # U[0, 1); keep w.p. 1 − p
                kept = torch.where(u >= p, t * scale, 0.0)
                acc = kept if acc is None else acc + kept
            out[key] = acc
    return TaskVector(out)


# ---------------------------------------------------------------------------------------------- Breadcrumbs
def _breadcrumbs_mask(t: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Bool mask of the entries ranked in [⌊β·C⌋, ⌊(β+γ)·C⌋) by decreasing magnitude within each row.

    Rows: a 0-/1-D tensor is one row; otherwise dim 0 indexes rows and the other dims are flattened
    (C entries per row). Ties in magnitude are ranked by position (stable sort), so counts are exact.
    """
    if t.numel() == 0:
        return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    rows = t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)  # (R, C)
    c = rows.shape[1]
    lo, hi = count(beta, c), count(min(1.0, beta + gamma), c)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=t.device)
    if hi > lo:
        order = torch.argsort(rows.abs(), dim=1, descending=True, stable=True)  # (R, C) column ids
        mask.scatter_(1, order[:, lo:hi], True)
    return mask.reshape(t.shape)


@MERGES.register("breadcrumbs")
def merge_breadcrumbs(
    vectors: Mapping[str, TaskVector], *, beta: float = 0.1, gamma: float = 0.2
) -> TaskVector:
    """Model Breadcrumbs: per task and per row, zero the top-``beta`` fraction by magnitude (outliers)
    and everything below the next ``gamma`` fraction; sum the masked task vectors.

    Rows are along dim 0 (output channels); counts per row of C entries are ⌊β·C⌋ dropped and
    ⌊(β+γ)·C⌋ − ⌊β·C⌋ kept, so very short rows (C < 1/γ) keep nothing. (The official TaLoS scripts differ:
    rows along the last dimension, ⌊γ·C⌋ kept, attn/mlp/conv keys only in vision: ``variant="official"``.)
    ``beta`` in [0, 1) (0: no outlier removal), ``gamma`` in (0, 1], ``beta + gamma <= 1``.
    """
    beta = real("beta", beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    gamma = fraction("gamma", gamma)
    if beta + gamma > 1.0 + 1e-9:
        raise ValueError(f"beta + gamma must be <= 1, got {beta} + {gamma}")
    _, vs, keys = tasks_of(vectors)
    dtype = compute_dtype(vs)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in keys:
            acc: torch.Tensor | None = None
            for v in vs:
                t = as_dtype(v[key], dtype)
                kept = torch.where(_breadcrumbs_mask(t, beta, gamma), t, 0.0)
                acc = kept if acc is None else acc + kept
            out[key] = acc
    return TaskVector(out)


# ---------------------------------------------------------------------------------------------- TALL-masks
def _check_lam(lam: Any) -> float:
    lam = real("lam", lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    return lam


def _tall(vs: list[TaskVector], keys: list[str], lam: float, dtype: torch.dtype
          ) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
    """Per key: (key, τ_MTL, [m_t]) with τ_MTL = Σ_t τ_t and m_t = |τ_t| ≥ lam · |τ_MTL − τ_t| (bool)."""
    for key in keys:
        ts = [as_dtype(v[key], dtype) for v in vs]
        mtl = ts[0].clone()
        for t in ts[1:]:
            mtl += t  # mtl is a fresh tensor, never an input
        yield key, mtl, [t.abs() >= lam * (mtl - t).abs() for t in ts]


@MERGES.register("tall_masks")
def merge_tall_masks(vectors: Mapping[str, TaskVector], *, lam: float = 0.2) -> dict[str, TaskVector]:
    """TALL-masks (the TALL-masks paper): per task t, the edit m_t ⊙ τ_MTL with m_t = |τ_t| ≥ lam · |τ_MTL − τ_t|,
    τ_MTL = Σ τ_t. (The official TaLoS scripts use m_t ⊙ τ_t with a strict mask and no |·| on the right.)

    Returns task -> TaskVector; each task is evaluated with its own edit. The paper's λ defaults differ
    by domain (0.2 vision, 0.6 NLP); the domain passes its own ``lam``.
    """
    lam = _check_lam(lam)
    names, vs, keys = tasks_of(vectors)
    dtype = compute_dtype(vs)
    per_task: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    with torch.no_grad():
        for key, mtl, masks in _tall(vs, keys, lam, dtype):
            for n, m in zip(names, masks):
                per_task[n][key] = torch.where(m, mtl, 0.0)
    return {n: TaskVector(d) for n, d in per_task.items()}


@MERGES.register("consensus")
def merge_consensus(vectors: Mapping[str, TaskVector], *, k: int = 2, lam: float = 0.2) -> TaskVector:
    """Consensus Task Arithmetic: τ_MTL on the coordinates selected by at least ``k`` TALL masks, else 0.

    ``k`` larger than the number of tasks selects nothing (a warning, and a zero vector).
    """
    k = integer("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    lam = _check_lam(lam)
    names, vs, keys = tasks_of(vectors)
    if k > len(names):
        warnings.warn(f"consensus k={k} exceeds the number of tasks ({len(names)}): the merge is zero",
                      stacklevel=2)
    dtype = compute_dtype(vs)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, mtl, masks in _tall(vs, keys, lam, dtype):
            votes = torch.stack(masks).sum(0)  # (*shape): number of tasks whose mask selects the entry
            out[key] = torch.where(votes >= k, mtl, 0.0)
    return TaskVector(out)


# ---------------------------------------------------------------------------------------------- entry point
def _hparams_of(fn: MergeFn) -> dict[str, Any]:
    """Keyword-only parameters of a merge function and their defaults (its hyperparameters)."""
    out: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            if p.default is p.empty:
                raise TypeError(f"merge hyperparameter {p.name!r} of {fn.__name__} has no default")
            out[p.name] = p.default
    return out


def _takes_any_kwargs(fn: MergeFn) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


VARIANTS = ("paper", "official")


def _official_hparams() -> dict[str, dict[str, Any]]:
    from .official_merges import OFFICIAL

    return {name: _hparams_of(rules.addition) for name, rules in OFFICIAL.items()}


def hparams_of(name: str, variant: str = "paper") -> dict[str, Any]:
    """{hyperparameter: default} of merge ``name`` in ``variant`` (``sum`` has no official variant of its own)."""
    _check_variant(variant)
    if variant == "official" and name in _official_hparams():
        return _official_hparams()[name]
    return _hparams_of(MERGES.get(name))


def _has_official_rules(name: str) -> bool:
    """Whether the official scripts have their own rules for ``name`` (a merge registered elsewhere, and
    ``sum``, have one definition for both variants)."""
    return name in _official_hparams()


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown merge variant {variant!r}; valid choices: {', '.join(VARIANTS)}")


def merge(name: str, vectors: Mapping[str, TaskVector], variant: str = "paper",
          **hparams: Any) -> "TaskVector | dict[str, TaskVector]":
    """Merge ``vectors`` with the registered method ``name``.

    ``variant="paper"``: the method papers' definitions (this module); ``"official"``: the official TaLoS
    scripts' rules (:mod:`talos.official_merges`), which produced the paper's baseline rows. Unknown method
    names and variants raise ValueError with the valid list; hyperparameters the method does not take raise
    ValueError listing the accepted ones; out-of-range values raise ValueError from the method.
    """
    _check_hparams(name, hparams, variant)
    if variant == "official" and _has_official_rules(name):
        from .official_merges import OFFICIAL

        return OFFICIAL[name].addition(vectors, **hparams)
    return MERGES.get(name)(vectors, **hparams)


def _check_hparams(name: str, hparams: Mapping[str, Any], variant: str = "paper") -> None:
    """ValueError for an unknown method (with the valid list) or a hyperparameter it does not take."""
    fn = MERGES.get(name)
    accepted = hparams_of(name, variant)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown and not ((variant == "paper" or not _has_official_rules(name)) and _takes_any_kwargs(fn)):
        listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for merge method {name!r}; "
            f"accepted (with defaults): {listed}"
        )


def _consensus_negation(vectors: Mapping[str, TaskVector], *, k: int = 2, lam: float = 0.2) -> dict[str, TaskVector]:
    """Per task, τ_t on the coordinates selected by at least ``k`` TALL masks of all tasks (else 0)."""
    selected = merge_consensus(vectors, k=k, lam=lam)
    names, vs, keys = tasks_of(vectors)
    dtype = compute_dtype(vs)
    with torch.no_grad():
        return {n: TaskVector({key: torch.where(selected[key] != 0, as_dtype(v[key], dtype), 0.0) for key in keys})
                for n, v in zip(names, vs)}


#: merges whose negation edits are not "the method applied to each task's vector alone" (see the module doc).
NEGATION_OVERRIDES: dict[str, Callable[..., dict[str, TaskVector]]] = {"consensus": _consensus_negation}


def negation_edits(name: str, vectors: Mapping[str, TaskVector], variant: str = "paper",
                   **hparams: Any) -> dict[str, TaskVector]:
    """Per task, the vector that task negation subtracts (θ0 − α · edit[t]) under merge method ``name``.

    ``variant="official"``: the official negation scripts' edits (:mod:`talos.official_merges`). Validation
    (unknown method, variant or hyperparameter, bad values) is that of :func:`merge`.
    """
    _check_hparams(name, hparams, variant)
    if variant == "official" and _has_official_rules(name):
        from .official_merges import OFFICIAL

        return OFFICIAL[name].negation(vectors, **hparams)
    if name in NEGATION_OVERRIDES:
        return NEGATION_OVERRIDES[name](vectors, **hparams)
    if name in PER_TASK:
        return merge(name, vectors, **hparams)  # type: ignore[return-value]
    return {t: merge(name, {t: v}, **hparams) for t, v in vectors.items()}  # type: ignore[misc]


def normalizer_edits(name: str, vectors: Mapping[str, TaskVector], variant: str = "paper",
                     **hparams: Any) -> dict[str, TaskVector] | None:
    """Per task, the edit whose single-task accuracy normalises the addition row of merge ``name``.

    None (``paper`` variant, or ``sum``): the mode's fine-tuned accuracy. ``official``: the merge's own
    single-task edit at coefficient 1 (the official ``eval_*_single_task.py`` scripts, whose accuracies the
    official addition scripts divide by), which equals its negation edit.
    """
    if variant != "official" or not _has_official_rules(name):
        _check_hparams(name, hparams, variant)
        return None
    return negation_edits(name, vectors, variant, **hparams)


def all_hparams() -> dict[str, dict[str, Any]]:
    """method -> {hyperparameter: default} over both variants, for every method registered now (a merge
    registered by another module after this one is imported is included; the paper's default wins on a
    shared name)."""
    out = {m: _hparams_of(MERGES.get(m)) for m in MERGES.names()}
    for m, hps in _official_hparams().items():
        out[m] = {**hps, **out.get(m, {})}
    return out
