"""One evaluation driver for the NLP protocols: ``single_task``, ``addition``, ``negation``.

    python nlp/eval_single_task.py   --model t5-base --finetuning-mode talos --save runs
    python nlp/eval_task_addition.py --model t5-base --finetuning-mode talos --merge sum ...
    python nlp/eval_task_negation.py --model t5-base --finetuning-mode talos --control-dataset rte ...

Each reads the task vectors that finetune.py wrote for the same hyperparameters, skips itself when its
results exist, writes results.json (+ config) in its run folder, and optionally merges into --results-json.
Accuracy is rank classification over each task's answer choices.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py` from the repository root
    # the script's folder must not be on the path: nlp/datasets.py would shadow Hugging Face `datasets`
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from talos import distributed as dist
from talos.merges import merge_kwargs_from_args
from talos.pipeline import PROTOCOLS, run_protocol
from talos.runinfo import run_metadata
from talos.tracking import Tracker

from nlp.args import parse_args
from nlp.common import data_kwargs, eval_run, load_task_vectors, make_evaluator
from nlp.datasets import check_tasks

logger = logging.getLogger("talos")


def main(protocol: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one protocol for ``--finetuning-mode`` over ``--eval-datasets``; returns its results."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, description=__doc__)
    args.device = dist.init_from_env(args.device)  # torchrun: evaluation examples are sharded over ranks
    tasks = list(args.eval_datasets)
    check_tasks(tasks + ([args.control_dataset] if protocol == "negation" else []), splits=("val", "test"),
                **data_kwargs(args))  # fail before loading any model
    extra: dict[str, Any] = {}
    if protocol == "addition":
        extra = {"merge": args.merge, "merge_kwargs": merge_kwargs_from_args(args, args.merge)}
    elif protocol == "negation":
        extra = {"control": args.control_dataset, "threshold": args.control_threshold}
    run = eval_run(args, protocol, extra)
    return run_protocol(
        protocol, run=run, single_task_run=eval_run(args, "single_task"), mode=args.finetuning_mode,
        load_task_vectors=lambda: load_task_vectors(args, tasks), make_evaluator=lambda: make_evaluator(args),
        control=args.control_dataset, merge=args.merge, merge_kwargs=extra.get("merge_kwargs"),
        n_points=args.n_eval_points, threshold=args.control_threshold, seed=args.seed,
        config={"args": dict(vars(args)), **run_metadata(list(argv) if argv is not None else None)},
        make_tracker=lambda r: Tracker(args.wandb, project=args.wandb_project, entity=args.wandb_entity,
                                       name=f"{args.model}-{args.finetuning_mode}-{protocol}-{r.hash}",
                                       config=vars(args), dir=r.dir),
        results_json=args.results_json,
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "single_task", sys.argv[2:])
