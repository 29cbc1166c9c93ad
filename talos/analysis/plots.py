"""Matplotlib (Agg) drawings of the figures' numbers: each ``plot_*`` takes the JSON-ready numbers and a path.

Files are written through a temporary name and renamed, so a figure on disk is always complete.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .compute import KIND_ORDER, layer_order

__all__ = ["pyplot", "short", "plot_addition_negation", "plot_disentanglement", "plot_accuracy_ratio",
           "plot_masks", "plot_sensitivity_transfer", "plot_linearized", "plot_gradient_drift",
           "plot_sparsity_ablation"]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short(task: str) -> str:
    """Compact task label (the demo's ``Toy`` prefix dropped)."""
    return task[3:] if task.startswith("Toy") else task


def _save(fig, path: Path | str, **kw: Any) -> None:
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110, **kw)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3) if n <= 6 else min(n, 4)
    return max(1, math.ceil(n / cols)), cols


def _panels(n: int, w: float, h: float):
    rows, cols = _grid(n)
    fig, axes = pyplot().subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.35, hspace=0.45)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes, cols


def _matrix_text(ax, m: Sequence[Sequence[float]], light) -> None:
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if light(v) else "black")


def plot_addition_negation(results: Mapping[str, Any], path: Path | str) -> None:
    """Task addition (absolute / normalised) and negation (target / control) per mode and merge, from a
    results.json (schema of :mod:`talos.report`)."""
    add, neg, merges = results.get("addition", {}), results.get("negation", {}), results.get("merges", {})
    zs = results.get("single_task", {}).get("zeroshot", {})
    fig, axes = pyplot().subplots(1, 2, figsize=(13, 4.2))
    ax = axes[0]
    names = list(add) + [f"std+{m}" for m in merges if m != "sum"]
    rows = [add[m] for m in add] + [merges[m] for m in merges if m != "sum"]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * r["absolute"] for r in rows], 0.4, label="absolute")
    ax.bar([i + 0.2 for i in x], [100 * r["normalized"] for r in rows], 0.4, label="normalised")
    if zs:
        ax.axhline(100 * sum(zs.values()) / len(zs), color="k", ls="--", lw=1, label="zero-shot (absolute)")
    ax.set_xticks(list(x), names, rotation=35, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Task addition (mean over tasks, test)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    names = list(neg)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * neg[m]["target"] for m in names], 0.4, label="target (lower is better)")
    ax.bar([i + 0.2 for i in x], [100 * neg[m]["control"] for m in names], 0.4, label="control")
    ax.set_xticks(list(x), names, rotation=35, ha="right")
    ax.set_ylim(0, 105)
    ax.set_title("Task negation (mean over tasks, test)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def plot_disentanglement(xi: Mapping[str, Sequence[Sequence[float]]], pair: Sequence[str],
                         alphas: Sequence[float], path: Path | str, note: str = "") -> None:
    """Fig. 2: one ξ(α1, α2) heat map per mode (lighter = more disentangled)."""
    import torch

    modes = list(xi)
    fig, axes, cols = _panels(len(modes), 3.7, 3.5)
    ticks = [f"{a:g}" for a in alphas]
    inner = [i for i, a in enumerate(alphas) if 0 <= a <= 1]
    im = None
    for k, (ax, m) in enumerate(zip(axes.flat, modes)):
        grid = torch.as_tensor(xi[m], dtype=torch.float32)
        im = ax.imshow(grid.numpy(), origin="lower", cmap="magma_r", vmin=0, vmax=2)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel(f"α2 ({short(pair[1])})", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(f"α1 ({short(pair[0])})", fontsize=8)
        mean = float(grid[inner][:, inner].mean()) if inner else float("nan")
        ax.set_title(f"{m}\nmean ξ on [0,1]² = {mean:.2f}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="ξ(α1, α2)  (0 = disentangled, max 2)")
    fig.suptitle(f"Weight disentanglement error ξ(α1, α2), {short(pair[0])} + {short(pair[1])}{note}", fontsize=11)
    _save(fig, path, bbox_inches="tight")


def _ratio_panels(mats: Mapping[str, Sequence[Sequence[float]]], rows_l: Sequence[str], cols_l: Sequence[str],
                  path: Path | str, ylabel: str, cbar: str, title: str) -> None:
    from matplotlib.colors import TwoSlopeNorm

    names = list(mats)
    fig, axes, cols = _panels(len(names), 4.2, 4.0)
    vmax = max([2.0] + [v for m in names for row in mats[m] for v in row])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    im = None
    for k, (ax, m) in enumerate(zip(axes.flat, names)):
        im = ax.imshow(mats[m], cmap="RdBu", norm=norm)
        _matrix_text(ax, mats[m], lambda v: abs(v - 1) > 0.6 * (vmax - 1))
        ax.set_xticks(range(len(cols_l)), [short(t) for t in cols_l], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows_l)), [short(t) for t in rows_l], fontsize=7)
        ax.set_xlabel("evaluated on task j", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(m, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label=cbar)
    fig.suptitle(title, fontsize=11)
    _save(fig, path, bbox_inches="tight")


def plot_accuracy_ratio(ratio: Mapping[str, Sequence[Sequence[float]]], tasks: Sequence[str], path: Path | str,
                        note: str = "") -> None:
    """Fig. 3: acc(θ0 + τ_i on j) / acc(θ0 on j), one heat map per mode."""
    _ratio_panels(ratio, tasks, tasks, path, "task vector of task i", "acc(θ0 + τ_i on j) / acc(θ0 on j)",
                  f"Accuracy ratio to zero-shot{note}; red < 1: task vector i hurts task j")


def plot_sensitivity_transfer(ratio: Mapping[str, Sequence[Sequence[float]]], tasks: Sequence[str],
                              fraction: float, path: Path | str, note: str = "") -> None:
    """Fig. 1: accuracy ratio on task j after pruning the least / most sensitive entries found on task i."""
    mats = {f"prune {100 * fraction:g}% least sensitive": ratio["least"],
            f"prune {100 * fraction:g}% most sensitive": ratio["most"]}
    _ratio_panels(mats, tasks, tasks, path, "sensitivity measured on task i",
                  "acc(pruned θ0 on j) / acc(θ0 on j)", f"Sensitivity transfer across tasks{note}")


def plot_masks(stats: Mapping[str, Any], sparsity: float, path: Path | str) -> None:
    """Fig. 11: kept fraction per layer and per tensor kind, and mask IoU across tasks."""
    tasks = list(stats["per_layer"])
    layers = layer_order(k for t in tasks for k in stats["per_layer"][t])
    fig, axes = pyplot().subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    ax = axes[0]
    for t in tasks:
        ax.plot(range(len(layers)), [stats["per_layer"][t].get(layer, float("nan")) for layer in layers],
                marker="o", label=short(t))
    ax.axhline(1 - sparsity, color="k", ls="--", lw=1, label=f"overall density {1 - sparsity:g}")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set_ylabel("kept (trainable) fraction")
    ax.set_title("masks: kept fraction per layer")
    ax.legend(fontsize=7)
    ax = axes[1]
    kinds = sorted({k for t in tasks for k in stats["per_kind"][t]}, key=lambda k: (KIND_ORDER + [k]).index(k))
    w = 0.8 / max(1, len(tasks))
    for i, t in enumerate(tasks):
        ax.bar([j + (i - (len(tasks) - 1) / 2) * w for j in range(len(kinds))],
               [stats["per_kind"][t].get(k, 0.0) for k in kinds], w, label=short(t))
    ax.axhline(1 - sparsity, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_title("kept fraction per tensor kind")
    ax = axes[2]
    iou = [[stats["iou"][a][b] for b in tasks] for a in tasks]
    im = ax.imshow(iou, cmap="viridis", vmin=0, vmax=1)
    _matrix_text(ax, iou, lambda v: v <= 0.6)
    ax.set_xticks(range(len(tasks)), [short(t) for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [short(t) for t in tasks], fontsize=8)
    ax.set_title("mask overlap across tasks (IoU)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    _save(fig, path)


def plot_linearized(per_mode: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path | str) -> None:
    """Fig. 6: fine-tuned (x) vs post-hoc-linearized (y) accuracy, one point per task, one colour per mode."""
    fig, ax = pyplot().subplots(figsize=(5.2, 5))
    lo = 100.0
    for m, r in per_mode.items():
        tasks = list(r["finetuned"])
        xs, ys = [100 * r["finetuned"][t] for t in tasks], [100 * r["linearized"][t] for t in tasks]
        lo = min([lo] + xs + ys)
        ax.scatter(xs, ys, label=m, s=28)
    lo = max(0.0, lo - 5)
    ax.plot([lo, 100], [lo, 100], color="k", ls="--", lw=1, label="bisector")
    ax.set_xlim(lo, 100)
    ax.set_ylim(lo, 100)
    ax.set_xlabel("accuracy of θ0 + τ (%)")
    ax.set_ylabel("accuracy of the linearized model at θ0 + τ (%)")
    ax.set_title("Linearized behaviour (on the bisector = linear)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_gradient_drift(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path | str) -> None:
    """Fig. 7: relative gradient drift ‖g(θ_i) − g(θ0)‖² / ‖g(θ0)‖² over steps, one colour per mode
    (one line per task)."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (m, per_task) in enumerate(curves.items()):
        for i, (t, c) in enumerate(per_task.items()):
            ax.plot(c["steps"], c["relative"], color=colours[k % len(colours)], alpha=0.8, lw=1.3,
                    label=m if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("‖∇f(θ_i) − ∇f(θ0)‖² / ‖∇f(θ0)‖²")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title("Gradient drift during fine-tuning (one line per task)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_sparsity_ablation(rows: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path | str) -> None:
    """Fig. 8: mean single-task accuracy and normalised (and absolute) addition accuracy against sparsity k,
    ``rows[mode][k]`` (one colour per mode, one line style per quantity)."""
    fig, ax = pyplot().subplots(figsize=(5.8, 4))
    colours = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (mode, per_k) in enumerate(rows.items()):
        ks = sorted(per_k, key=float)
        for key, label, style in (("single_task", "single-task", "o-"), ("normalized", "addition, normalised", "s-"),
                                  ("absolute", "addition, absolute", "^--")):
            ax.plot([float(k) for k in ks], [100 * per_k[k][key] for k in ks], style,
                    color=colours[c % len(colours)], label=f"{mode}: {label}")
    ax.set_xlabel("sparsity k (fraction of entries frozen)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Sparsity ablation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
