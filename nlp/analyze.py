"""The paper's figures from NLP run folders: ``python nlp/analyze.py FIGURE [the nlp flags] [figure flags]``.

    python nlp/analyze.py accuracy_ratio --model t5-base --save runs
    python nlp/analyze.py mask_overlap --model t5-base --save runs

FIGURE is one of ``talos.analysis.FIGURES`` (sensitivity_transfer, disentanglement, accuracy_ratio, linearized,
gradient_drift, sparsity_ablation, mask_overlap). The NLP flags locate the runs exactly as the fine-tuning and
evaluation scripts do; answers are scored by rank classification as in nlp/evaluate.py. The PNG and the JSON of
its numbers go to ``SAVE/nlp/<model>/eval/figure_<FIGURE>/<hash>/`` (skipped when they exist; ``--force``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (nlp/datasets.py would shadow HF `datasets`)

import torch

from talos import distributed as dist
from talos.app.flags import Config
from talos.analysis.figures import AnalysisDomain, LoadedModel, main as analysis_main
from nlp.args import DOMAIN as SETTINGS
from nlp.common import DOMAIN, RUNS, Batches, NLPSetup, check_eval_data, make_evaluator
from nlp.scoring import choice_log_likelihoods


class SubsetSetup(NLPSetup):
    """An NLPSetup whose evaluation batches hold a seeded random subset of ``--max-examples`` examples (the
    calibration batches keep the whole validation split)."""

    def eval_batches(self, task: str, split: str) -> list[dict[str, Any]]:
        n = self.args.max_examples
        exs = self.examples(task, split)
        if n is None or n >= len(exs):
            return super().eval_batches(task, split)
        key = (task, split, dist.rank(), dist.world_size(), n)
        if key not in self._eval_batches:
            order = torch.randperm(len(exs), generator=torch.Generator().manual_seed(0))[:n].tolist()
            sub = sorted(dist.shard([exs[i] for i in order]), key=lambda e: len(e.prompt))
            self._eval_batches[key] = list(Batches(sub, self.args.eval_batch_size, self.collate))
        return self._eval_batches[key]


def load(args: Config) -> LoadedModel:
    """The language model of ``args`` and the figures' hooks on it (evaluation as in nlp/evaluate.py)."""
    setup = SubsetSetup(args)
    return LoadedModel(model=setup.model, names=list(setup.eligible), eligible=list(setup.eligible),
                       evaluator=lambda lin: make_evaluator(setup, linearized=lin),
                       predictions=setup.predictions, forward_fn=choice_log_likelihoods,
                       calibration_batches=lambda task: setup.batches(task, "val", args.calibration_batch_size))


NLP = AnalysisDomain(name=DOMAIN, runs=RUNS, settings=SETTINGS, check_data=check_eval_data, load=load)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compute (or skip) one figure; returns its numbers."""
    return analysis_main(NLP, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
