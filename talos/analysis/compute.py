"""The numbers behind the paper's figures, computed from task vectors, masks and run results (no plotting).

Every function takes the evaluation interface of :mod:`talos.protocols` (``evaluate(edit, task, split) ->
accuracy``, θ0 + edit, None = zero-shot) or a ``predict(edit, task, split) -> class indices`` of the same
shape, so the figures measure models exactly as the protocols do.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..coefficients import disentanglement_error
from ..task_vector import TaskVector

__all__ = ["XI_ALPHAS", "SPARSITIES", "combination", "accuracy_ratios", "disentanglement", "linearized_behaviour",
           "prune_edit", "sensitivity_transfer", "layer_of", "kind_of", "layer_order", "KIND_ORDER", "mask_stats",
           "Predict"]

#: the α grid of the disentanglement heat maps (both axes)
XI_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
#: the sparsities of the paper's ablation (Fig. 8)
SPARSITIES = (0.75, 0.85, 0.90, 0.95, 0.99)

Evaluate = Callable[[TaskVector | None, str, str], float]
Predict = Callable[[TaskVector | None, str, str], Tensor]


def combination(tvs: Sequence[TaskVector], coefs: Sequence[float]) -> TaskVector | None:
    """Σ coef_t τ_t over the nonzero coefficients (None when all are zero: the zero-shot model)."""
    edit = None
    for tv, c in zip(tvs, coefs):
        if c != 0:
            edit = tv * c if edit is None else edit + tv * c
    return edit


# ------------------------------------------------------------------------------------------ accuracy based
def accuracy_ratios(evaluate: Evaluate, tvs: Mapping[str, TaskVector], tasks: Sequence[str],
                    split: str = "test") -> dict[str, Any]:
    """Fig. 3: ``ratio[i][j]`` = acc(θ0 + τ_i on task j) / acc(θ0 on task j), rows and columns in ``tasks``."""
    zs = {t: evaluate(None, t, split) for t in tasks}
    acc = [[evaluate(tvs[i], j, split) for j in tasks] for i in tasks]
    ratio = [[acc[a][b] / max(1e-12, zs[tasks[b]]) for b in range(len(tasks))] for a in range(len(tasks))]
    return {"zeroshot": zs, "accuracy": acc, "ratio": ratio}


def disentanglement(predict: Predict, tv1: TaskVector, tv2: TaskVector, pair: Sequence[str],
                    alphas: Sequence[float] = XI_ALPHAS, split: str = "test") -> Tensor:
    """Fig. 2: ξ(α1, α2) on ``pair``'s ``split`` (:func:`talos.coefficients.disentanglement_error`), shape [A, A]."""
    def pred(a1: float, a2: float, t: int) -> Tensor:
        return predict(combination((tv1, tv2), (a1, a2)), pair[t], split)

    return disentanglement_error(pred, alphas, alphas)


def linearized_behaviour(evaluate: Evaluate, evaluate_linearized: Evaluate, tvs: Mapping[str, TaskVector],
                         split: str = "test") -> dict[str, dict[str, float]]:
    """Fig. 6: per task, accuracy of θ0 + τ_t through the model and through its linearization around θ0."""
    return {"finetuned": {t: evaluate(tv, t, split) for t, tv in tvs.items()},
            "linearized": {t: evaluate_linearized(tv, t, split) for t, tv in tvs.items()}}


def prune_edit(theta0: Mapping[str, Tensor], scores: Mapping[str, Tensor], fraction: float,
               which: str) -> tuple[TaskVector, dict[str, Tensor]]:
    """The edit that zeroes (prunes) the ``fraction`` of entries with the lowest (``which="least"``) or highest
    (``"most"``) ``scores`` over all tensors together, and the pruned masks ``{name: bool}``.

    Exactly ``floor(fraction x N)`` entries are pruned (ties broken by position, stable sort).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"prune fraction must be in (0, 1), got {fraction}")
    if which not in ("least", "most"):
        raise ValueError(f"which must be 'least' or 'most', got {which!r}")
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names])
    k = int(fraction * flat.numel())
    order = torch.sort(flat, stable=True, descending=which == "most").indices[:k]
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[order] = True
    masks, edit, start = {}, {}, 0
    for n in names:
        size = scores[n].numel()
        m = pruned[start:start + size].view(scores[n].shape)
        start += size
        masks[n] = m
        if m.any():
            edit[n] = -theta0[n].detach().cpu() * m  # θ0 + edit = θ0 with the pruned entries set to 0
    return TaskVector(edit), masks


def sensitivity_transfer(evaluate: Evaluate, theta0: Mapping[str, Tensor], scores: Mapping[str, Mapping[str, Tensor]],
                         tasks: Sequence[str], fraction: float, split: str = "test") -> dict[str, Any]:
    """Fig. 1: prune the ``fraction`` least / most sensitive entries found on task A (``scores[A]``) and evaluate
    on every task B; ``ratio[which][a][b]`` = acc(pruned on B) / acc(θ0 on B)."""
    zs = {t: evaluate(None, t, split) for t in tasks}
    out: dict[str, Any] = {"zeroshot": zs, "accuracy": {}, "ratio": {}, "pruned_fraction": {}}
    for which in ("least", "most"):
        acc, frac = [], {}
        for a in scores:
            edit, masks = prune_edit(theta0, scores[a], fraction, which)
            frac[a] = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            acc.append([evaluate(edit, b, split) for b in tasks])
        out["accuracy"][which] = acc
        out["ratio"][which] = [[row[j] / max(1e-12, zs[b]) for j, b in enumerate(tasks)] for row in acc]
        out["pruned_fraction"][which] = frac
    return out


# ------------------------------------------------------------------------------------------------- masks
_LAYER_PATTERNS = (  # (regex on the parameter name, label format): CLIP, T5, GPT-2 / Llama-style stacks
    (re.compile(r"transformer\.resblocks\.(\d+)\."), "block {}"),
    (re.compile(r"encoder\.block\.(\d+)\."), "enc {}"),
    (re.compile(r"decoder\.block\.(\d+)\."), "dec {}"),
    (re.compile(r"(?:^|\.)(?:h|layers?|blocks?)\.(\d+)\."), "block {}"),
)


def layer_of(name: str) -> str:
    """Coarse layer of a parameter: patch, ln_pre, block k (enc k / dec k for encoder-decoders), ln_post,
    final norm, or 'other'."""
    for pattern, label in _LAYER_PATTERNS:
        m = pattern.search(name)
        if m:
            return label.format(m.group(1))
    for key, label in (("conv1", "patch"), ("ln_pre", "ln_pre"), ("ln_post", "ln_post"),
                       ("final_layer_norm", "final norm"), ("ln_f", "final norm"), ("norm.weight", "final norm")):
        if key in name:
            return label
    return "other"


def kind_of(name: str) -> str:
    """Tensor kind: attn qkv / q / k / v / out, cross q / k / v / out, mlp in / out, patch embed, bias, layer norm
    (:func:`mask_stats` further splits a fused attn qkv into attn q / k / v)."""
    if ".ln" in name or "ln_" in name or "layer_norm" in name or "norm." in name:
        return "layer norm"
    if name.endswith("bias"):
        return "bias"
    t5 = re.search(r"(SelfAttention|EncDecAttention)\.([qkvo])\.", name)
    if t5:
        head = "attn" if t5.group(1) == "SelfAttention" else "cross"
        return f"{head} {'out' if t5.group(2) == 'o' else t5.group(2)}"
    for key, label in (("in_proj_weight", "attn qkv"), ("c_attn.", "attn qkv"), ("attn.c_proj", "attn out"),
                       ("out_proj.weight", "attn out"), ("c_fc.", "mlp in"), ("c_proj.", "mlp out"),
                       ("DenseReluDense.wi", "mlp in"), ("DenseReluDense.wo", "mlp out"), ("conv1", "patch embed")):
        if key in name:
            return label
    return "other"


#: display order of the tensor kinds
KIND_ORDER = ["patch embed", "attn q", "attn k", "attn v", "attn qkv", "attn out", "cross q", "cross k", "cross v",
              "cross out", "mlp in", "mlp out", "bias", "layer norm", "other"]


def _kind_parts(name: str, mask: Tensor) -> list[tuple[str, Tensor]]:
    """(kind, entries): a fused attention in-projection weight splits into its q, k and v row blocks."""
    if name.endswith("in_proj_weight") and mask.shape[0] % 3 == 0:
        return [(f"attn {k}", part) for k, part in zip("qkv", mask.chunk(3, dim=0))]
    return [(kind_of(name), mask)]


def layer_order(layers) -> list[str]:
    """Layers in network order: patch, ln_pre, blocks (encoder before decoder), ln_post, final norm, other."""
    rank = {"patch": 0, "ln_pre": 0.5, "block": 1, "enc": 1, "dec": 1.5, "ln_post": 2, "final norm": 2.5, "other": 3}

    def key(layer: str):
        head, _, idx = layer.rpartition(" ")
        if head in ("block", "enc", "dec") and idx.isdigit():
            return (rank[head], int(idx))
        return (rank.get(layer, 3), 0)

    return sorted(set(layers), key=key)


def mask_stats(masks: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """Fig. 11: kept fraction per layer / kind / tensor for each task's mask (``{task: {name: bool}}``), overall
    density, and the pairwise IoU of the masks (|A ∩ B| / |A ∪ B| over all entries)."""
    tasks = list(masks)
    out: dict[str, Any] = {"per_layer": {}, "per_kind": {}, "per_tensor": {}, "density": {}, "iou": {}}
    for t, m in masks.items():
        agg_l: dict[str, list[int]] = {}
        agg_k: dict[str, list[int]] = {}
        for n, v in m.items():
            a = agg_l.setdefault(layer_of(n), [0, 0])
            a[0] += int(v.sum())
            a[1] += v.numel()
            for kind, part in _kind_parts(n, v):
                a = agg_k.setdefault(kind, [0, 0])
                a[0] += int(part.sum())
                a[1] += part.numel()
        out["per_layer"][t] = {k: a / b for k, (a, b) in agg_l.items()}
        out["per_kind"][t] = {k: a / b for k, (a, b) in agg_k.items()}
        out["per_tensor"][t] = {n: float(v.float().mean()) for n, v in m.items()}
        out["density"][t] = sum(int(v.sum()) for v in m.values()) / max(1, sum(v.numel() for v in m.values()))
    for a in tasks:
        out["iou"][a] = {}
        for b in tasks:
            if set(masks[a]) != set(masks[b]):
                raise ValueError(f"masks of {a} and {b} cover different tensors")
            inter = sum(int((masks[a][n].bool() & masks[b][n].bool()).sum()) for n in masks[a])
            union = sum(int((masks[a][n].bool() | masks[b][n].bool()).sum()) for n in masks[a])
            out["iou"][a][b] = inter / union if union else 1.0  # two empty masks are identical
    return out
