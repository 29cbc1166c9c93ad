"""One evaluation driver for the NLP protocols: ``single_task``, ``addition``, ``negation``.

    python nlp/eval_single_task.py   --model t5-base --finetuning-mode talos --save runs
    python nlp/eval_task_addition.py --model t5-base --finetuning-mode talos --merge sum ...
    python nlp/eval_task_negation.py --model t5-base --finetuning-mode talos --control-dataset rte ...

Each reads the task vectors that finetune.py wrote for the same hyperparameters, skips itself when its
results exist, writes results.json (+ config) in its run folder, and optionally merges into --results-json.
Accuracy is rank classification over each task's answer choices.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (nlp/datasets.py would shadow HF `datasets`)

from talos.app.evaluation_script import evaluation_main

from nlp.args import parse_args
from nlp.common import RUNS, NLPSetup, check_eval_data, make_evaluator


def main(protocol: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one protocol for ``--finetuning-mode`` over ``--eval-datasets``; returns its results."""
    return evaluation_main(protocol, argv, description=__doc__, parse_args=parse_args, runs=RUNS,
                           check_data=check_eval_data, setup=NLPSetup, make_evaluator=make_evaluator)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "single_task", sys.argv[2:])
