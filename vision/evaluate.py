"""One evaluation driver for the vision protocols: ``single_task``, ``addition``, ``negation``.

    python vision/eval_single_task.py   --model ViT-B-32 --finetuning-mode talos --save runs --data-location ~/data
    python vision/eval_task_addition.py --model ViT-B-32 --finetuning-mode talos --merge sum ...
    python vision/eval_task_negation.py --model ViT-B-32 --finetuning-mode talos --control-dataset ImageNet ...

Each reads the task vectors that finetune.py wrote for the same hyperparameters, skips itself when its
results exist, writes results.json (+ config) in its run folder, and optionally merges into --results-json.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talos import distributed as dist
from talos import evaluation
from talos.io import atomic_write_json, read_json
from talos.merges import merge_kwargs_from_args
from talos.modes import get_mode
from talos.report import update_results
from talos.runinfo import run_metadata, seed_everything
from talos.tracking import Tracker

from vision.args import parse_args
from vision.common import Evaluator, VisionSetup, eval_run, load_task_vectors
from vision.datasets import check_datasets

logger = logging.getLogger("talos")
PROTOCOLS = ("single_task", "addition", "negation")


def _single_task(args, ev, tvs) -> dict[str, Any]:
    res = evaluation.single_task(ev, tvs)
    res["task_vector_density"] = {t: tv.density() for t, tv in tvs.items()}
    return res


def single_task_results(args, ev, tvs) -> dict[str, Any]:
    """Single-task results, read from their run folder when single-task evaluation already ran."""
    run = eval_run(args, "single_task")
    if run.results.exists():
        return read_json(run.results)
    res = _single_task(args, ev, tvs)
    if dist.is_main():
        atomic_write_json(run.results, res)
    dist.barrier()
    return res


def main(protocol: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one protocol for ``--finetuning-mode`` over ``--eval-datasets``; returns its results."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, description=__doc__)
    args.device = dist.init_from_env(args.device)  # torchrun: evaluation batches are sharded over ranks
    tasks = list(args.eval_datasets)
    check_datasets(tasks + ([args.control_dataset] if protocol == "negation" else []), args.data_location)
    extra: dict[str, Any] = {}
    if protocol == "addition":
        extra = {"merge": args.merge, "merge_kwargs": merge_kwargs_from_args(args, args.merge)}
    elif protocol == "negation":
        extra = {"control": args.control_dataset, "threshold": args.control_threshold}
    run = eval_run(args, protocol, extra)
    if run.results.exists():
        logger.info("skip: %s results exist (%s)", protocol, run.results)
        result = read_json(run.results)
    else:
        seed_everything(args.seed)
        tvs = load_task_vectors(args, tasks)  # fails fast (with the command to run) if one is missing
        if dist.is_main():
            run.write_config({"args": vars(args), **run_metadata(list(argv) if argv is not None else None)})
        tracker = Tracker(args.wandb and dist.is_main(), project=args.wandb_project, entity=args.wandb_entity,
                          name=f"{args.model}-{args.finetuning_mode}-{protocol}-{run.hash}",
                          config=vars(args), dir=run.dir)
        setup = VisionSetup(args)
        ev = Evaluator(setup, linearized=get_mode(args.finetuning_mode).eval_linearized)
        if protocol == "single_task":
            result = single_task_results(args, ev, tvs)
        elif protocol == "addition":
            ft = single_task_results(args, ev, tvs)["val"], single_task_results(args, ev, tvs)["test"]
            result = evaluation.task_addition(
                ev, tvs, {"val": ft[0]["finetuned"], "test": ft[1]["finetuned"]}, merge_method=args.merge,
                merge_kwargs=extra["merge_kwargs"], n_points=args.n_eval_points,
                on_point=lambda a, accs: tracker.log({f"addition/val/{t}": v for t, v in accs.items()}))
        else:
            result = evaluation.task_negation(ev, tvs, args.control_dataset, threshold=args.control_threshold,
                                              n_points=args.n_eval_points)
        if dist.is_main():
            atomic_write_json(run.results, result)
        dist.barrier()
        tracker.summary({f"{protocol}/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        tracker.finish()
    if args.results_json and dist.is_main():
        _export(args, protocol, result)
    logger.info("%s: %s", protocol, {k: v for k, v in result.items() if isinstance(v, (int, float))})
    return result


def _export(args, protocol: str, result: dict[str, Any]) -> None:
    mode = args.finetuning_mode
    if protocol == "single_task":
        update_results(args.results_json, "single_task", mode, result["test"]["finetuned"])
        update_results(args.results_json, "single_task", "zeroshot", result["test"]["zeroshot"])
        update_results(args.results_json, "task_vector_density", mode, result["task_vector_density"])
    elif protocol == "addition":
        row = {k: result[k] for k in ("absolute", "normalized", "coef")}
        if args.merge == "sum":
            update_results(args.results_json, "addition", mode, row)
        if mode == "standard":
            update_results(args.results_json, "merges", args.merge, row)
    else:
        update_results(args.results_json, "negation", mode,
                       {"target": result["target"], "control": result["control"], "coef": result["coef"]})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "single_task", sys.argv[2:])
