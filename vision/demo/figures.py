"""Figures and diagnostics of a demo run (PNG, matplotlib Agg), drawn by the analysis layer (``talos.analysis``).

    python -m vision.demo.figures --results-json OUT/results.json --figures-dir OUT <the pipeline's flags>

Takes the same flags as the vision scripts (so run hashes resolve to the same folders) and writes, with the
same code as ``python vision/analyze.py FIGURE`` (only the file names and the example subsets differ):

* ``addition_negation.png``   task addition (absolute / normalised) and negation (target / control) per mode,
                              plus the post-hoc merges of standard task vectors;
* ``disentanglement.png``     weight-disentanglement error ξ(α1, α2) for one task pair, one panel per mode
                              (lighter = more disentangled; Fig. 2);
* ``accuracy_ratio.png``      accuracy of θ0 + τ_i on task j divided by zero-shot accuracy on j, per mode (Fig. 3);
* ``linearized.png``          accuracy of θ0 + τ through the model vs through its linearization (Fig. 6);
* ``sensitivity_transfer.png`` pruning the least / most Fisher-sensitive entries of task i, evaluated on j (Fig. 1);
* ``talos_masks.png``         kept fraction per layer and per tensor kind of the TaLoS masks, and their
                              overlap (IoU) across tasks (Fig. 11);
* ``diagnostics.json``        the numbers behind them, plus task-vector norms and cosine similarities.

Modes whose task vectors are missing (a failed or skipped run) are left out and listed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from talos.analysis import FIGURES, FigureContext, XI_ALPHAS
from talos.analysis.compute import kind_of, layer_of, mask_stats  # noqa: F401  (the demo's public names)
from talos.analysis import plots
from talos.analysis.figures import AnalysisSettings
from talos.app.flags import Config, build_parser as settings_parser, parse
from talos.config import Settings, setting

logger = logging.getLogger("talos")

__all__ = ["XI_ALPHAS", "kind_of", "layer_of", "mask_stats", "build_parser", "main", "task_vector_stats"]


def task_vector_stats(tvs: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """L2 norm of each task vector and the cosine similarity of each pair."""
    norms = {t: v.norm() for t, v in tvs.items()}
    cos = {a: {b: tvs[a].dot(tvs[b]) / max(1e-12, norms[a] * norms[b]) for b in tvs} for a in tvs}
    return norms, cos


@dataclass
class DemoFigureSettings(Settings):
    """Where the demo's figures go and how many examples each uses."""

    figures_dir: str = setting("", "where the PNGs and diagnostics.json go (required)", hashed=False)
    pair: list | None = setting(None, "two comma-separated tasks for ξ (default: the first two)", csv=True, kind=list,
                                hashed=False)
    xi_examples: int = setting(100, "test images per task for ξ", low=1, hashed=False)
    ratio_examples: int = setting(200, "test images per task for the accuracy ratios, the linearized check and "
                                  "sensitivity transfer", low=1, hashed=False)
    modes: list | None = setting(None, "comma-separated modes (default: every registered mode)", csv=True, kind=list,
                                 hashed=False)

    def check(self) -> None:
        super().check()
        if not self.figures_dir:
            raise ValueError("--figures-dir is required")


def _domain():
    from vision.args import DOMAIN

    return replace(DOMAIN, description=__doc__.split("\n\n")[0], extra={"demo": DemoFigureSettings})


def build_parser():
    """The vision flags plus the demo's figure flags."""
    return settings_parser(_domain())


def _context(args: Config, modes: list[str], max_examples: int, pair: list[str]) -> FigureContext:
    from vision.analyze import VISION

    groups = {k: g for k, g in args if k != "demo"}
    groups["analysis"] = AnalysisSettings(modes=modes, max_examples=max_examples, split="test", pair=pair,
                                          alphas=list(XI_ALPHAS), prune_fraction=None, sparsities=[args.sparsity],
                                          force=False)
    return FigureContext(VISION, Config(args.domain, groups, args.argv).freeze())


def _figure(name: str, ctx: FigureContext) -> dict[str, Any]:
    spec = FIGURES.get(name)
    return spec.compute(ctx, spec.plan(ctx))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from talos.io import atomic_write_json, read_json
    from talos.modes import MODES, run_order

    args = parse(_domain(), argv)
    out = Path(args.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(args.eval_datasets)
    pair = list(args.pair) if args.pair else tasks[:2]
    wanted = list(args.modes) if args.modes else [m for m in run_order() if m in MODES]
    results = read_json(args.results_json) if args.results_json and Path(args.results_json).exists() else {}
    written = []
    if results.get("addition") or results.get("negation"):
        plots.plot_addition_negation(results, out / "addition_negation.png")
        written.append("addition_negation.png")

    probe = _context(args, wanted, args.ratio_examples, pair)
    modes = [m for m in wanted if probe.has_task_vectors(m, tasks)]
    diag: dict[str, Any] = {"pair": pair, "alphas": list(XI_ALPHAS),
                            "skipped_modes": {m: "task vectors missing" for m in wanted if m not in modes}}
    if modes:
        ctx = _context(args, modes, args.ratio_examples, pair)
        ratio = _figure("accuracy_ratio", ctx)
        diag["zeroshot_test_subset"] = zs = ratio["zeroshot"]
        full = results.get("single_task", {}).get("zeroshot", {})
        for t in tasks:  # the subset should be representative of the test split
            if t in full and abs(full[t] - zs[t]) > 0.1:
                logger.warning("zero-shot accuracy of %s on the figure subset (%.3f) is far from the full test "
                               "split (%.3f)", t, zs[t], full[t])
        own = [m for m in modes if ctx.source(m) == m]  # posthoc's points would be standard's
        lin = _figure("linearized", _context(args, own, args.ratio_examples, pair))
        sens = _figure("sensitivity_transfer", ctx)
        xi = _figure("disentanglement", _context(args, modes, args.xi_examples, pair))
        stats = {m: task_vector_stats(ctx.task_vectors(m, tasks)) for m in modes}
        diag.update(task_vector_norm={m: s[0] for m, s in stats.items()},
                    task_vector_cosine={m: s[1] for m, s in stats.items()}, accuracy_ratio=ratio["ratio"],
                    xi=xi["xi"], linearized=lin["per_mode"],
                    sensitivity_transfer={k: sens[k] for k in ("fraction", "ratio", "accuracy")})
        note = f" ({args.xi_examples} random test images of each)"
        plots.plot_disentanglement(xi["xi"], pair, xi["alphas"], out / "disentanglement.png", note=note)
        plots.plot_accuracy_ratio(ratio["ratio"], tasks, out / "accuracy_ratio.png",
                                  note=f" ({args.ratio_examples} random test images per task, α = 1)")
        plots.plot_linearized(lin["per_mode"], out / "linearized.png")
        plots.plot_sensitivity_transfer(sens["ratio"], tasks, sens["fraction"], out / "sensitivity_transfer.png",
                                        note=f" ({args.ratio_examples} random test images per task)")
        written += ["disentanglement.png", "accuracy_ratio.png", "linearized.png", "sensitivity_transfer.png"]
    if "talos" in modes:
        masks = _figure("mask_overlap", _context(args, ["talos"], args.ratio_examples, pair))
        diag["talos_masks"] = {k: masks[k] for k in ("per_layer", "per_kind", "per_tensor", "density", "iou")}
        plots.plot_masks(masks, args.sparsity, out / "talos_masks.png")
        written.append("talos_masks.png")
    atomic_write_json(out / "diagnostics.json", diag)
    for w in written:
        print(f"wrote {out / w}")
    return diag


if __name__ == "__main__":
    main()
