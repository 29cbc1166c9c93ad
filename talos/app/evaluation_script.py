"""The body of every domain's evaluation script (``vision/evaluate.py``, ``nlp/evaluate.py``): parse the flags,
join ``torchrun``, then run one protocol with the domain's data check and evaluator."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from .. import distributed as dist
from ..protocols import Evaluate
from ..modes import get_mode
from .flags import Config
from .jobs import evaluate
from .runs import RunPaths

__all__ = ["evaluation_main"]


def evaluation_main(protocol: str, argv: Sequence[str] | None, *, description: str | None,
                    parse_args: Callable[..., Config], runs: RunPaths,
                    check_data: Callable[[Config, list[str]], None],
                    setup: Callable[[Config], Any],
                    make_evaluator: Callable[[Any, bool], Evaluate]) -> dict[str, Any]:
    """Run ``protocol`` for ``--finetuning-mode`` over ``--eval-datasets``; returns its results.

    ``check_data(args, tasks)`` raises before any model loads when data are missing; the evaluator is
    ``make_evaluator(setup(args), linearized)``, linearized when the mode evaluates through the Taylor expansion.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, description=description)
    args = args.replace(device=dist.init_from_env(args.device))  # torchrun: the evaluation data are sharded over ranks
    linearized = get_mode(args.finetuning_mode).eval_linearized
    return evaluate(protocol, args, runs=runs, check_data=lambda tasks: check_data(args, tasks),
                    make_evaluator=lambda: make_evaluator(setup(args), linearized))
