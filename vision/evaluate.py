"""One evaluation driver for the vision protocols: ``single_task``, ``addition``, ``negation``.

    python vision/eval_single_task.py   --model ViT-B-32 --finetuning-mode talos --save runs --data-location ~/data
    python vision/eval_task_addition.py --model ViT-B-32 --finetuning-mode talos --merge sum ...
    python vision/eval_task_negation.py --model ViT-B-32 --finetuning-mode talos --control-dataset ImageNet ...

Each reads the task vectors that finetune.py wrote for the same hyperparameters, skips itself when its
results exist, writes results.json (+ config) in its run folder, and optionally merges into --results-json.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python vision/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (vision/datasets.py would shadow HF `datasets`)

from talos.app.evaluation_script import evaluation_main

from vision.args import parse_args
from vision.common import RUNS, VisionSetup, check_eval_data, make_evaluator


def main(protocol: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one protocol for ``--finetuning-mode`` over ``--eval-datasets``; returns its results."""
    return evaluation_main(protocol, argv, description=__doc__, parse_args=parse_args, runs=RUNS,
                           check_data=check_eval_data, setup=VisionSetup, make_evaluator=make_evaluator)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "single_task", sys.argv[2:])
