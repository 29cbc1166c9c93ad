"""The figure registry and the driver behind ``python <domain>/analyze.py FIGURE [flags]``.

A figure reads existing run folders (task vectors, masks, evaluation results, gradient-drift records), computes
its numbers with :mod:`talos.analysis.compute` through the domain's own evaluator (the code the protocols use),
and writes ``<name>.png``, ``results.json`` (the numbers) and ``config.json`` under one path schema::

    SAVE/<domain>/<model>/eval/figure_<name>/<hash>/

The hash covers the figure's settings and the hashes of the runs it reads, so a figure is skipped when it
exists (``--force`` redraws it) and a new run gives a new folder. Missing inputs fail before any model loads,
naming the command that produces them; without ``--modes`` a figure uses every mode whose runs exist.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..app.flags import Config, Domain
from ..app.runs import RunPaths
from ..config import Settings, setting
from ..io import atomic_write_json, load_tensors, read_json
from ..paths import EvalRun
from ..registry import Registry
from . import compute as C
from . import plots as P
from .drift import drift_path

logger = logging.getLogger("talos")

__all__ = ["LoadedModel", "AnalysisDomain", "EditPredictor", "FigureContext", "FigureSpec", "FIGURES",
           "AnalysisSettings", "figure_run", "run_figure", "main"]

Evaluate = Callable[[Any, str, str], float]


@dataclass
class LoadedModel:
    """What the figures need of a domain's live model (loaded once per command)."""

    model: nn.Module
    names: list[str]  # parameters a task vector edits (eligible + dense)
    eligible: list[str]  # parameters sensitivity is scored on
    evaluator: Callable[[bool], Evaluate]  # linearized -> the domain's evaluate(edit, task, split)
    predictions: Callable[[nn.Module, str, str], Tensor]  # class indices [N] of a model on a task split
    forward_fn: Callable[[nn.Module, Any], Tensor]  # per-example class scores [B, C] (calibration forward)
    calibration_batches: Callable[[str], Iterable[Any]]  # a task's calibration batches (its model head set)


@dataclass
class AnalysisDomain:
    """A domain's adapter for the analysis commands: its settings, run paths, data check and model loader."""

    name: str
    runs: RunPaths
    settings: Domain
    check_data: Callable[[Config, list[str]], None]
    load: Callable[[Config], LoadedModel]


class EditPredictor:
    """``predict(edit, task, split) -> class indices`` of θ0 + edit (optionally through the linearized model)."""

    def __init__(self, model: nn.Module, names: Sequence[str],
                 predictions: Callable[[nn.Module, str, str], Tensor], linearized: bool = False) -> None:
        from ..linearize import LinearizedModel
        from ..stages import ParameterEditor

        self.editor = ParameterEditor(model, names)
        self.eval_model = LinearizedModel(model, list(names)) if linearized else model
        self.predictions = predictions

    def __call__(self, edit, task: str, split: str) -> Tensor:
        self.editor.apply(edit)
        self.eval_model.eval()
        return self.predictions(self.eval_model, task, split)


# ------------------------------------------------------------------------------------------------ context
class FigureContext:
    """One figure command: parsed flags, run lookup, and the model (loaded lazily, once)."""

    def __init__(self, domain: AnalysisDomain, args: Config) -> None:
        self.domain, self.args = domain, args
        self.tasks = list(args.eval_datasets)
        self._loaded: LoadedModel | None = None
        self._evaluators: dict[bool, Evaluate] = {}
        self._predictors: dict[bool, EditPredictor] = {}

    def mode_args(self, mode: str, **over: Any) -> Config:
        """The settings with ``--finetuning-mode`` (and any override) replaced."""
        return self.args.replace(finetuning_mode=mode, **over)

    def source(self, mode: str) -> str:
        """The mode whose runs hold ``mode``'s task vectors (``posthoc`` -> ``standard``)."""
        from ..modes import get_mode

        m = get_mode(mode)
        return m.source_mode or m.name

    def run_hashes(self, mode: str, tasks: Sequence[str]) -> dict[str, str]:
        """``{task: fine-tuning run hash}`` of ``mode``'s runs."""
        margs = self.mode_args(self.source(mode))
        return {t: self.domain.runs.finetune(margs, t).hash for t in tasks}

    def available_modes(self, default: Sequence[str], has_runs: Callable[[str], bool]) -> tuple[list[str], list[str]]:
        """(modes, skipped): ``--modes`` as given (missing runs fail later, naming the command), else the
        ``default`` modes whose runs exist."""
        from ..modes import MODES

        if self.args.modes:
            for m in self.args.modes:
                MODES.get(m)  # unknown names raise with the valid list
            return list(self.args.modes), []
        keep = [m for m in default if has_runs(m)]
        skipped = [m for m in default if m not in keep]
        if not keep:
            raise FileNotFoundError(f"no runs of any of the modes {', '.join(default)} under {self.args.save} for "
                                    f"the tasks {', '.join(self.tasks)}; run the table sweep first "
                                    f"(launch_scripts/{self.domain.name}_table.sh) or pass --modes")
        if skipped:
            logger.info("modes without runs, left out: %s", ", ".join(skipped))
        return keep, skipped

    def has_task_vectors(self, mode: str, tasks: Sequence[str]) -> bool:
        margs = self.mode_args(self.source(mode))
        return all(self.domain.runs.finetune(margs, t).task_vector.exists() for t in tasks)

    def require_task_vectors(self, mode: str, tasks: Sequence[str]) -> None:
        """Raise (naming the fine-tuning command) when one of ``mode``'s task vectors is missing."""
        margs = self.mode_args(self.source(mode))
        for t in tasks:
            if not self.domain.runs.finetune(margs, t).task_vector.exists():
                self.domain.runs.task_vectors(self.mode_args(mode), [t])  # raises with the command

    def task_vectors(self, mode: str, tasks: Sequence[str]) -> dict:
        """``mode``'s task vectors (a missing one raises, naming the fine-tuning command)."""
        return self.domain.runs.task_vectors(self.mode_args(mode), tasks)

    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            from ..runinfo import seed_everything

            self.domain.check_data(self.args, self.tasks)
            seed_everything(self.args.seed)  # as the protocols: a random-init θ0 (--pretrained none) is the same
            self._loaded = self.domain.load(self.args)
        return self._loaded

    def evaluate(self, linearized: bool) -> Evaluate:
        """The domain's evaluator (what the protocols use), through the linearized model if asked."""
        if linearized not in self._evaluators:
            self._evaluators[linearized] = self.loaded().evaluator(linearized)
        return self._evaluators[linearized]

    def predict(self, linearized: bool) -> EditPredictor:
        if linearized not in self._predictors:
            L = self.loaded()
            self._predictors[linearized] = EditPredictor(L.model, L.names, L.predictions, linearized)
        return self._predictors[linearized]


def _linearized(mode: str) -> bool:
    from ..modes import get_mode

    return get_mode(mode).eval_linearized


def _all_modes() -> list[str]:
    from ..modes import run_order

    return run_order()


def _data_settings(ctx: FigureContext) -> dict[str, Any]:
    a = ctx.args
    # the model group's result-changing settings name the weights (pretrained tag or file, tokenizer, ...)
    return {"tasks": ctx.tasks, "split": a.split, "max_examples": a.max_examples, "model": a.group("model").hashed()}


# ------------------------------------------------------------------------------------------------ figures
@dataclass
class FigureSpec:
    """A figure: ``plan(ctx)`` (inputs and settings, hashed; raises on missing inputs before any model loads),
    ``compute(ctx, plan)`` (the JSON numbers) and ``plot(numbers, path, ctx)``."""

    name: str
    paper: str
    plan: Callable[[FigureContext], dict[str, Any]]
    compute: Callable[[FigureContext, dict[str, Any]], dict[str, Any]]
    plot: Callable[[dict[str, Any], Any, FigureContext], None]


FIGURES: Registry[FigureSpec] = Registry("figure")


def _register(spec: FigureSpec) -> FigureSpec:
    return FIGURES.register(spec.name)(spec)


def _tv_plan(ctx: FigureContext, tasks: Sequence[str], own_vectors: bool = False) -> dict[str, Any]:
    """Modes (``own_vectors``: only those with task vectors of their own, not posthoc), the hashes of their runs
    and the data settings; missing task vectors of ``--modes`` raise here."""
    default = [m for m in _all_modes() if not own_vectors or ctx.source(m) == m]
    modes, skipped = ctx.available_modes(default, lambda m: ctx.has_task_vectors(m, tasks))
    for m in modes:
        ctx.require_task_vectors(m, tasks)
    return {"modes": modes, "skipped_modes": skipped, "runs": {m: ctx.run_hashes(m, tasks) for m in modes},
            **_data_settings(ctx)}


# Fig. 1 --------------------------------------------------------------------------------------------------
def _sens_plan(ctx: FigureContext) -> dict[str, Any]:
    a = ctx.args
    fraction = a.prune_fraction if a.prune_fraction is not None else round(1 - a.sparsity, 10)
    return {"fraction": fraction, "fisher_target": a.fisher_target, "fisher_draws": a.fisher_draws,
            "calibration_batches": a.calibration_batches, "calibration_batch_size": a.calibration_batch_size,
            "seed": a.seed, **_data_settings(ctx)}


def _sens_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    from ..fisher import fisher_scores

    L, ev = ctx.loaded(), ctx.evaluate(False)
    named = dict(L.model.named_parameters())
    theta0 = {n: named[n].detach().cpu().clone() for n in L.eligible}
    scores = {}
    for t in ctx.tasks:
        batches = L.calibration_batches(t)
        if plan["calibration_batches"] is not None:
            batches = list(itertools.islice(batches, plan["calibration_batches"]))
        s = fisher_scores(L.model, batches, L.forward_fn, params=L.eligible, target=plan["fisher_target"],
                          draws=plan["fisher_draws"], generator=torch.Generator().manual_seed(plan["seed"]))
        scores[t] = {n: v.cpu() for n, v in s.items()}
    out = C.sensitivity_transfer(ev, theta0, scores, ctx.tasks, plan["fraction"], plan["split"])
    return {"tasks": ctx.tasks, "fraction": plan["fraction"], **out}


_register(FigureSpec(
    "sensitivity_transfer", "Fig. 1", _sens_plan, _sens_compute,
    lambda n, path, ctx: P.plot_sensitivity_transfer(n["ratio"], n["tasks"], n["fraction"], path)))


# Fig. 2 --------------------------------------------------------------------------------------------------
def _xi_plan(ctx: FigureContext) -> dict[str, Any]:
    pair = list(ctx.args.pair) if ctx.args.pair else ctx.tasks[:2]
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"the disentanglement error needs two different tasks (--pair A,B), got {pair}")
    alphas = list(ctx.args.alphas) if ctx.args.alphas else list(C.XI_ALPHAS)
    return {"pair": pair, "alphas": alphas, **_tv_plan(ctx, pair)}


def _xi_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    xi = {}
    for m in plan["modes"]:
        tvs = ctx.task_vectors(m, plan["pair"])
        xi[m] = C.disentanglement(ctx.predict(_linearized(m)), tvs[plan["pair"][0]], tvs[plan["pair"][1]],
                                  plan["pair"], plan["alphas"], plan["split"]).tolist()
    return {"pair": plan["pair"], "alphas": plan["alphas"], "xi": xi, "skipped_modes": plan["skipped_modes"]}


_register(FigureSpec("disentanglement", "Fig. 2", _xi_plan, _xi_compute,
                     lambda n, path, ctx: P.plot_disentanglement(n["xi"], n["pair"], n["alphas"], path)))


# Fig. 3 --------------------------------------------------------------------------------------------------
def _ratio_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    ratio, acc, zs = {}, {}, {}
    for m in plan["modes"]:
        r = C.accuracy_ratios(ctx.evaluate(_linearized(m)), ctx.task_vectors(m, ctx.tasks), ctx.tasks, plan["split"])
        ratio[m], acc[m], zs = r["ratio"], r["accuracy"], r["zeroshot"]
    return {"tasks": ctx.tasks, "ratio": ratio, "accuracy": acc, "zeroshot": zs,
            "skipped_modes": plan["skipped_modes"]}


_register(FigureSpec("accuracy_ratio", "Fig. 3", lambda ctx: _tv_plan(ctx, ctx.tasks), _ratio_compute,
                     lambda n, path, ctx: P.plot_accuracy_ratio(n["ratio"], n["tasks"], path)))


# Fig. 6 --------------------------------------------------------------------------------------------------
def _lin_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    per = {m: C.linearized_behaviour(ctx.evaluate(False), ctx.evaluate(True), ctx.task_vectors(m, ctx.tasks),
                                     plan["split"]) for m in plan["modes"]}
    return {"tasks": ctx.tasks, "per_mode": per, "skipped_modes": plan["skipped_modes"]}


# (posthoc is left out by default: its points are standard's, both evaluations are made for every mode)
_register(FigureSpec("linearized", "Fig. 6", lambda ctx: _tv_plan(ctx, ctx.tasks, own_vectors=True), _lin_compute,
                     lambda n, path, ctx: P.plot_linearized(n["per_mode"], path)))


# Fig. 7 --------------------------------------------------------------------------------------------------
def _drift_file(ctx: FigureContext, mode: str, task: str):
    return drift_path(ctx.domain.runs.finetune(ctx.mode_args(mode), task).dir)


def _drift_plan(ctx: FigureContext) -> dict[str, Any]:
    trained = [m for m in _all_modes() if ctx.source(m) == m]  # posthoc has no fine-tuning of its own
    modes, skipped = ctx.available_modes(
        trained, lambda m: all(_drift_file(ctx, m, t).exists() for t in ctx.tasks))
    for m in modes:
        for t in ctx.tasks:
            f = _drift_file(ctx, m, t)
            if not f.exists():
                raise FileNotFoundError(
                    f"no gradient-drift record for {t} ({m}) at {f}; fine-tune with --gradient-drift-every N, e.g. "
                    f"python {ctx.domain.name}/finetune.py --finetuning-mode {m} --train-dataset {t} "
                    "--gradient-drift-every 10 (a completed run is skipped: use a new --save or remove its folder)")
    return {"modes": modes, "skipped_modes": skipped, "runs": {m: ctx.run_hashes(m, ctx.tasks) for m in modes},
            "tasks": ctx.tasks}


def _drift_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    curves: dict[str, dict[str, Any]] = {}
    for m in plan["modes"]:
        curves[m] = {}
        for t in ctx.tasks:
            rec = read_json(_drift_file(ctx, m, t))
            steps = [r["step"] for r in rec["records"]]
            drift = [r["drift"] for r in rec["records"]]
            g0 = rec["g0_norm_sq"]
            curves[m][t] = {"steps": steps, "drift": drift, "g0_norm_sq": g0,
                            "relative": [d / g0 if g0 > 0 else 0.0 for d in drift]}
    return {"tasks": ctx.tasks, "curves": curves, "skipped_modes": plan["skipped_modes"]}


_register(FigureSpec("gradient_drift", "Fig. 7", _drift_plan, _drift_compute,
                     lambda n, path, ctx: P.plot_gradient_drift(n["curves"], path)))


# Fig. 8 --------------------------------------------------------------------------------------------------
def _ablation_runs(ctx: FigureContext, mode: str, k: float) -> tuple[EvalRun, EvalRun]:
    a = ctx.mode_args(mode, sparsity=k, merge="sum")
    runs = ctx.domain.runs
    # the same folders eval_single_task.py / eval_task_addition.py (--merge sum) write
    return runs.evaluation(a, "single_task"), runs.evaluation(a, "addition")


def _ablation_plan(ctx: FigureContext) -> dict[str, Any]:
    modes = list(ctx.args.modes) if ctx.args.modes else ["talos"]
    ks = list(ctx.args.sparsities)
    runs: dict[str, dict[str, list[str]]] = {}
    for m in modes:
        runs[m] = {}
        for k in ks:
            for r in _ablation_runs(ctx, m, k):
                if not r.results.exists():
                    raise FileNotFoundError(
                        f"no {r.protocol} results for {m} at sparsity {k} ({r.results}); run "
                        f"bash launch_scripts/sparsity_ablation.sh {ctx.domain.name} <the same flags>")
            runs[m][str(k)] = [r.hash for r in _ablation_runs(ctx, m, k)]
    return {"modes": modes, "sparsities": ks, "runs": runs, "tasks": ctx.tasks}


def _ablation_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for m in plan["modes"]:
        rows[m] = {}
        for k in plan["sparsities"]:
            st, add = (read_json(r.results) for r in _ablation_runs(ctx, m, k))
            ft = st["test"]["finetuned"]
            rows[m][str(k)] = {"single_task": sum(ft[t] for t in ctx.tasks) / len(ctx.tasks),
                               "normalized": add["normalized"], "absolute": add["absolute"]}
    return {"tasks": ctx.tasks, "rows": rows}


_register(FigureSpec("sparsity_ablation", "Fig. 8", _ablation_plan, _ablation_compute,
                     lambda n, path, ctx: P.plot_sparsity_ablation(n["rows"], path)))


# Fig. 11 -------------------------------------------------------------------------------------------------
def _mask_file(ctx: FigureContext, mode: str, task: str):
    return ctx.domain.runs.finetune(ctx.mode_args(mode), task).mask


def _mask_plan(ctx: FigureContext) -> dict[str, Any]:
    from ..modes import get_mode

    mode = ctx.args.modes[0] if ctx.args.modes else "talos"
    if (ctx.args.modes and len(ctx.args.modes) != 1) or not get_mode(mode).sparse:
        raise ValueError(f"mask_overlap takes one sparse mode (--modes talos), got {ctx.args.modes}")
    for t in ctx.tasks:
        if not _mask_file(ctx, mode, t).exists():
            raise FileNotFoundError(f"no mask for {t} ({mode}) at {_mask_file(ctx, mode, t)}; run: python "
                                    f"{ctx.domain.name}/finetune.py --finetuning-mode {mode} --train-dataset {t} "
                                    "(with the same flags)")
    return {"mode": mode, "sparsity": ctx.args.sparsity, "runs": ctx.run_hashes(mode, ctx.tasks), "tasks": ctx.tasks}


def _mask_compute(ctx: FigureContext, plan: dict[str, Any]) -> dict[str, Any]:
    masks = {t: {k: v.bool() for k, v in load_tensors(_mask_file(ctx, plan["mode"], t)).items()} for t in ctx.tasks}
    return {"mode": plan["mode"], "sparsity": plan["sparsity"], **C.mask_stats(masks)}


_register(FigureSpec("mask_overlap", "Fig. 11", _mask_plan, _mask_compute,
                     lambda n, path, ctx: P.plot_masks(n, n["sparsity"], path)))


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class AnalysisSettings(Settings):
    """The flags of the analyze commands (the domain's own flags locate the runs)."""

    figure: str = setting("", "the figure to compute (talos.analysis.figures.FIGURES)", flag="figure", hashed=False)
    modes: list | None = setting(None, "comma-separated modes (default: every registered mode whose runs exist; "
                                 "talos for mask_overlap and sparsity_ablation)", csv=True, kind=list, hashed=False)
    pair: list | None = setting(None, "two tasks for disentanglement (default: the first two)", csv=True, kind=list,
                                hashed=False)
    alphas: list | None = setting(None, "coefficient grid of both axes of ξ (default: "
                                  f"{','.join(f'{a:g}' for a in C.XI_ALPHAS)})", csv=float, kind=list, hashed=False)
    split: str = setting("test", "split the figures evaluate on", choices=("test", "val"), hashed=False)
    max_examples: int | None = setting(None, "a seeded random subset of this many examples per task split "
                                       "(default: all)", low=1, kind=int, hashed=False)
    prune_fraction: float | None = setting(None, "sensitivity_transfer: fraction of entries pruned (default: "
                                           "1 - --sparsity, the entries TaLoS trains)", low=0.0, high=1.0,
                                           open_low=True, open_high=True, kind=float, hashed=False)
    sparsities: list = setting(list(C.SPARSITIES), "sparsity_ablation: the k values", csv=float, kind=list,
                               hashed=False)
    force: bool = setting(False, "recompute and redraw even when the figure exists", hashed=False)

    def check(self) -> None:
        """The figure exists; the grids are non-empty and in range."""
        super().check()
        FIGURES.get(self.figure)  # unknown names raise with the valid list
        if not self.sparsities or not all(0.0 < k < 1.0 for k in self.sparsities):
            raise ValueError(f"--sparsities must be in (0, 1), got {self.sparsities}")
        if self.alphas is not None and not self.alphas:
            raise ValueError("--alphas is empty")


def figure_run(ctx: FigureContext, name: str, plan: dict[str, Any]) -> EvalRun:
    """The figure's folder: ``SAVE/<domain>/<model>/eval/figure_<name>/<hash of the plan>``."""
    return EvalRun(ctx.args.save, ctx.domain.name, ctx.args.model, f"figure_{name}", {"figure": name, **plan})


def run_figure(ctx: FigureContext, name: str, force: bool = False) -> tuple[dict[str, Any], EvalRun]:
    """Plan (fail fast), skip when done, else compute, draw ``<name>.png`` and write ``results.json`` last."""
    spec = FIGURES.get(name)
    plan = spec.plan(ctx)
    run = figure_run(ctx, name, plan)
    png = run.dir / f"{name}.png"
    if run.results.exists() and png.exists() and not force:
        logger.info("skip: %s exists (%s)", name, run.dir)
        print(f"exists: {png}")
        return read_json(run.results), run
    numbers = spec.compute(ctx, plan)
    spec.plot(numbers, png, ctx)
    run.write_config({"settings": ctx.args.to_dict(), "paper": spec.paper})
    atomic_write_json(run.results, numbers)  # written last: marks the figure complete
    print(f"wrote {png}\nwrote {run.results}")
    return numbers, run


def main(domain: AnalysisDomain, argv: Sequence[str] | None = None, description: str = "") -> dict[str, Any]:
    """``<domain>/analyze.py FIGURE [the domain's flags] [figure flags]``; returns the figure's numbers."""
    from dataclasses import replace

    from ..app.flags import parse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = replace(domain.settings, extra={"analysis": AnalysisSettings})
    cfg = parse(settings, argv, description=description or f"figures of {domain.name} runs")
    numbers, _ = run_figure(FigureContext(domain, cfg), cfg.figure, force=cfg.force)
    return numbers
