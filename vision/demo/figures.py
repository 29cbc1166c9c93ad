"""Figures and diagnostics of a demo run (PNG, matplotlib Agg), from its results.json and saved runs.

    python -m vision.demo.figures --results-json OUT/results.json --figures-dir OUT <the pipeline's flags>

Takes the same flags as the vision scripts (so run hashes resolve to the same folders) and writes:

* ``addition_negation.png``   task addition (absolute / normalised) and negation (target / control) per mode,
                              plus the post-hoc merges of standard task vectors;
* ``disentanglement.png``     weight-disentanglement error ξ(α1, α2) for one task pair, one panel per mode
                              (lighter = more disentangled);
* ``accuracy_ratio.png``      accuracy of θ0 + τ_i on task j divided by zero-shot accuracy on j, per mode;
* ``talos_masks.png``         kept fraction per layer and per tensor kind of the TaLoS masks, and their
                              overlap (IoU) across tasks;
* ``diagnostics.json``        the numbers behind them, plus task-vector norms and cosine similarities.

Modes whose task vectors are missing (a failed or skipped run) are left out and listed.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger("talos")

#: the α grid of the disentanglement heat maps (both axes)
XI_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


def _mode_args(args: argparse.Namespace, mode: str) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "finetuning_mode": mode})


class Predictor:
    """Class predictions of θ0 + edit on cached test images of each task (the eval preprocessing): a seeded
    random subset of ``max_examples``; ``predict(..., n)`` uses its first ``n``.

    Holds one VisionSetup (one model load for every mode); ``linearized`` evaluates through the
    first-order Taylor model around θ0, as the pipeline does for linear / posthoc / llora.
    """

    def __init__(self, setup, tasks: Sequence[str], max_examples: int | None = None) -> None:
        from talos.linearize import LinearizedModel
        from talos.pipeline import ParameterEditor

        self.setup = setup
        self.editor = ParameterEditor(setup.classifier, setup.eligible + setup.dense)
        self.lin = LinearizedModel(setup.classifier, setup.eligible + setup.dense)
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in tasks:
            ds = setup.dataset(t, "test")
            n = len(ds) if max_examples is None else min(len(ds), max_examples)
            # a seeded random subset: image folders are sorted by class, so the first n would be few classes
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
            xs, ys = zip(*(ds[i] for i in order))
            self.data[t] = (torch.stack(xs), torch.tensor(ys))

    @torch.no_grad()
    def predict(self, edit, task: str, linearized: bool, n: int | None = None) -> torch.Tensor:
        self.editor.apply(edit)
        model = self.setup.use_task(task).eval()
        if linearized:
            model = self.lin.eval()
        x = self.data[task][0][:n]
        preds = [model(x[i : i + 512].to(self.setup.device)).argmax(-1).cpu() for i in range(0, len(x), 512)]
        return torch.cat(preds)

    def accuracy(self, edit, task: str, linearized: bool, n: int | None = None) -> float:
        return float((self.predict(edit, task, linearized, n) == self.data[task][1][:n]).float().mean())


def _combo(tvs, coefs):
    """Σ coef_t τ_t over nonzero coefficients (None when all are zero: the zero-shot model)."""
    edit = None
    for tv, c in zip(tvs, coefs):
        if c != 0:
            edit = tv * c if edit is None else edit + tv * c
    return edit


# ----------------------------------------------------------------------------------------------- masks
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def layer_of(name: str) -> str:
    """Coarse layer of an image-encoder parameter: patch, ln_pre, block k, ln_post (or 'other')."""
    m = _BLOCK.search(name)
    if m:
        return f"block {m.group(1)}"
    for key, label in (("conv1", "patch"), ("ln_pre", "ln_pre"), ("ln_post", "ln_post")):
        if key in name:
            return label
    return "other"


def kind_of(name: str) -> str:
    """Tensor kind: attn qkv / attn out / mlp in / mlp out weights, patch embed, bias, layer norm
    (:func:`mask_stats` further splits attn qkv into attn q / k / v)."""
    if ".ln" in name or "ln_" in name:
        return "layer norm"
    if name.endswith("bias"):
        return "bias"
    for key, label in (("in_proj_weight", "attn qkv"), ("out_proj.weight", "attn out"), ("c_fc.weight", "mlp in"),
                       ("c_proj.weight", "mlp out"), ("conv1", "patch embed")):
        if key in name:
            return label
    return "other"


def _kind_parts(name: str, mask: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(kind, entries): a fused attention in-projection weight splits into its q, k and v row blocks."""
    if name.endswith("in_proj_weight") and mask.shape[0] % 3 == 0:
        return [(f"attn {k}", part) for k, part in zip("qkv", mask.chunk(3, dim=0))]
    return [(kind_of(name), mask)]


def _layer_order(layers) -> list[str]:
    def key(layer: str):
        if layer.startswith("block "):
            return (1, int(layer.split()[1]))
        return ({"patch": 0, "ln_pre": 0.5, "ln_post": 2, "other": 3}[layer], 0)

    return sorted(set(layers), key=key)


def mask_stats(masks: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Kept fraction per layer / kind / tensor for each task's mask, and pairwise IoU of the masks."""
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
        out["density"][t] = sum(int(v.sum()) for v in m.values()) / sum(v.numel() for v in m.values())
    for a in tasks:
        out["iou"][a] = {}
        for b in tasks:
            inter = sum(int((masks[a][n] & masks[b][n]).sum()) for n in masks[a])
            union = sum(int((masks[a][n] | masks[b][n]).sum()) for n in masks[a])
            out["iou"][a][b] = inter / max(1, union)
    return out


# ----------------------------------------------------------------------------------------------- plots
def _short(task: str) -> str:
    return task[3:] if task.startswith("Toy") else task


def plot_addition_negation(results: dict, path: Path, plt) -> None:
    add, neg, merges = results.get("addition", {}), results.get("negation", {}), results.get("merges", {})
    zs = results.get("single_task", {}).get("zeroshot", {})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3) if n <= 6 else min(n, 4)
    return max(1, math.ceil(n / cols)), cols


def plot_disentanglement(xi: dict[str, torch.Tensor], pair: tuple[str, str], path: Path, plt,
                         n_examples: int) -> None:
    modes = list(xi)
    rows, cols = _grid(len(modes))
    fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 3.5 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.35, hspace=0.45)
    ticks = [f"{a:g}" for a in XI_ALPHAS]
    for ax in axes.flat[len(modes):]:
        ax.axis("off")
    im = None
    for k, (ax, m) in enumerate(zip(axes.flat, modes)):
        im = ax.imshow(xi[m].numpy(), origin="lower", cmap="magma_r", vmin=0, vmax=2)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel(f"α2 ({_short(pair[1])})", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel(f"α1 ({_short(pair[0])})", fontsize=8)
        inner = xi[m][[i for i, a in enumerate(XI_ALPHAS) if 0 <= a <= 1]][:, [i for i, a in enumerate(XI_ALPHAS) if 0 <= a <= 1]]
        ax.set_title(f"{m}\nmean ξ on [0,1]² = {float(inner.mean()):.2f}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="ξ(α1, α2)  (0 = disentangled, max 2)")
    fig.suptitle(f"Weight disentanglement error ξ(α1, α2), {_short(pair[0])} + {_short(pair[1])} "
                 f"({n_examples} random test images of each)", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy_ratio(ratio: dict[str, list[list[float]]], tasks: list[str], path: Path, plt,
                        n_examples: int) -> None:
    from matplotlib.colors import TwoSlopeNorm

    modes = list(ratio)
    rows, cols = _grid(len(modes))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.35, hspace=0.45)
    vmax = max(2.0, max(v for m in modes for row in ratio[m] for v in row))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    labels = [_short(t) for t in tasks]
    for ax in axes.flat[len(modes):]:
        ax.axis("off")
    im = None
    for k, (ax, m) in enumerate(zip(axes.flat, modes)):
        r = ratio[m]
        im = ax.imshow(r, cmap="RdBu", norm=norm)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{r[i][j]:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(r[i][j] - 1) > 0.6 * (vmax - 1) else "black")
        ax.set_xticks(range(len(tasks)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), labels, fontsize=7)
        ax.set_xlabel("evaluated on task j", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("task vector of task i", fontsize=8)
        ax.set_title(m, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="acc(θ0 + τ_i on j) / acc(θ0 on j)")
    fig.suptitle(f"Accuracy ratio to zero-shot ({n_examples} random test images per task, α = 1); "
                 "red < 1: task vector i hurts task j", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_masks(stats: dict[str, Any], sparsity: float, path: Path, plt) -> None:
    tasks = list(stats["per_layer"])
    layers = _layer_order(k for t in tasks for k in stats["per_layer"][t])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    ax = axes[0]
    for t in tasks:
        ax.plot(range(len(layers)), [stats["per_layer"][t].get(layer, float("nan")) for layer in layers],
                marker="o", label=_short(t))
    ax.axhline(1 - sparsity, color="k", ls="--", lw=1, label=f"overall density {1 - sparsity:g}")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set_ylabel("kept (trainable) fraction")
    ax.set_title("TaLoS masks: kept fraction per layer")
    ax.legend(fontsize=7)
    ax = axes[1]
    order = ["patch embed", "attn q", "attn k", "attn v", "attn out", "mlp in", "mlp out", "bias", "layer norm"]
    kinds = sorted({k for t in tasks for k in stats["per_kind"][t]}, key=lambda k: (order + [k]).index(k))
    w = 0.8 / max(1, len(tasks))
    for i, t in enumerate(tasks):
        ax.bar([j + (i - (len(tasks) - 1) / 2) * w for j in range(len(kinds))],
               [stats["per_kind"][t].get(k, 0.0) for k in kinds], w, label=_short(t))
    ax.axhline(1 - sparsity, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_title("kept fraction per tensor kind")
    ax = axes[2]
    iou = [[stats["iou"][a][b] for b in tasks] for a in tasks]
    im = ax.imshow(iou, cmap="viridis", vmin=0, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            ax.text(j, i, f"{iou[i][j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if iou[i][j] > 0.6 else "white")
    ax.set_xticks(range(len(tasks)), [_short(t) for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [_short(t) for t in tasks], fontsize=8)
    ax.set_title("mask overlap across tasks (IoU)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- driver
def build_parser() -> argparse.ArgumentParser:
    from vision.args import build_parser as vision_parser

    p = vision_parser(__doc__.split("\n\n")[0])
    g = p.add_argument_group("figures")
    g.add_argument("--figures-dir", required=True, help="where the PNGs and diagnostics.json go")
    g.add_argument("--pair", default=None, help="two comma-separated tasks for ξ (default: the first two)")
    g.add_argument("--xi-examples", type=int, default=100, help="test images per task for ξ")
    g.add_argument("--ratio-examples", type=int, default=200, help="test images per task for the accuracy ratios")
    g.add_argument("--modes", default=None, help="comma-separated modes (default: every registered mode)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from talos.io import atomic_write_json, load_tensors, read_json
    from talos.modes import MODES, get_mode, run_order

    from vision.args import validate
    from vision.common import VisionSetup, finetune_run, load_task_vectors

    args = validate(build_parser().parse_args(argv))
    out = Path(args.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(args.eval_datasets)
    pair = tuple(args.pair.split(",")) if args.pair else tuple(tasks[:2])
    modes = args.modes.split(",") if args.modes else [m for m in run_order() if m in MODES]
    results = read_json(args.results_json) if args.results_json and Path(args.results_json).exists() else {}
    diag: dict[str, Any] = {"pair": list(pair), "alphas": list(XI_ALPHAS), "skipped_modes": {}}
    written = []

    if results.get("addition") or results.get("negation"):
        plot_addition_negation(results, out / "addition_negation.png", plt)
        written.append("addition_negation.png")

    tvs: dict[str, dict] = {}
    for m in modes:
        try:
            tvs[m] = load_task_vectors(_mode_args(args, m), tasks)
        except FileNotFoundError as e:
            diag["skipped_modes"][m] = str(e).split(";")[0]
    setup = VisionSetup(args)
    pred = Predictor(setup, tasks, max_examples=max(args.ratio_examples, args.xi_examples))
    nr = args.ratio_examples
    zs = {t: pred.accuracy(None, t, False, nr) for t in tasks}
    diag["zeroshot_test_subset"] = zs
    full = results.get("single_task", {}).get("zeroshot", {})
    for t in tasks:  # the subset should be representative of the test split
        if t in full and abs(full[t] - zs[t]) > 0.1:
            logger.warning("zero-shot accuracy of %s on the figure subset (%.3f) is far from the full test split "
                           "(%.3f)", t, zs[t], full[t])
    xi, ratio, norms, cos = {}, {}, {}, {}
    for m in tqdm(list(tvs), desc="figures (modes)"):
        lin = get_mode(m).eval_linearized
        vs = tvs[m]
        norms[m] = {t: vs[t].norm() for t in tasks}
        cos[m] = {a: {b: vs[a].dot(vs[b]) / max(1e-12, norms[m][a] * norms[m][b]) for b in tasks} for a in tasks}
        ratio[m] = [[pred.accuracy(vs[i], j, lin, nr) / max(1e-9, zs[j]) for j in tasks] for i in tasks]
        t1, t2 = vs[pair[0]], vs[pair[1]]
        from talos.protocols import disentanglement_error

        def predict(a1: float, a2: float, t: int, _lin=lin, _t1=t1, _t2=t2):
            return pred.predict(_combo((_t1, _t2), (a1, a2)), pair[t], _lin, args.xi_examples)

        xi[m] = disentanglement_error(predict, XI_ALPHAS, XI_ALPHAS)
    setup.classifier.cpu()
    diag.update(task_vector_norm=norms, task_vector_cosine=cos, accuracy_ratio=ratio,
                xi={m: v.tolist() for m, v in xi.items()})
    if xi:
        plot_disentanglement(xi, pair, out / "disentanglement.png", plt, args.xi_examples)
        plot_accuracy_ratio(ratio, tasks, out / "accuracy_ratio.png", plt, args.ratio_examples)
        written += ["disentanglement.png", "accuracy_ratio.png"]

    if "talos" in tvs:
        margs = _mode_args(args, "talos")
        masks = {t: {k: v.bool() for k, v in load_tensors(finetune_run(margs, t).mask).items()} for t in tasks}
        diag["talos_masks"] = mask_stats(masks)
        plot_masks(diag["talos_masks"], args.sparsity, out / "talos_masks.png", plt)
        written.append("talos_masks.png")
    atomic_write_json(out / "diagnostics.json", diag)
    for w in written:
        print(f"wrote {out / w}")
    return diag


if __name__ == "__main__":
    main()
