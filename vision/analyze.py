"""The paper's figures from vision run folders: ``python vision/analyze.py FIGURE [the vision flags] [figure flags]``.

    python vision/analyze.py accuracy_ratio --model ViT-B-32 --data-location ~/data --save runs
    python vision/analyze.py disentanglement --pair Cars,DTD --max-examples 2000 ...

FIGURE is one of ``talos.analysis.FIGURES`` (sensitivity_transfer, disentanglement, accuracy_ratio, linearized,
gradient_drift, sparsity_ablation, mask_overlap). The vision flags locate the runs exactly as the fine-tuning
and evaluation scripts do; the PNG and the JSON of its numbers go to
``SAVE/vision/<model>/eval/figure_<FIGURE>/<hash>/`` (skipped when they exist; ``--force`` redraws).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python vision/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (vision/datasets.py would shadow HF `datasets`)

import torch

from talos.app.flags import Config
from talos.analysis.figures import AnalysisDomain, LoadedModel, main as analysis_main

from vision.args import DOMAIN as SETTINGS
from vision.common import RUNS, DOMAIN, VisionSetup, check_eval_data, logits_forward, make_evaluator


class SubsetSetup(VisionSetup):
    """A VisionSetup whose evaluation splits are a seeded random subset of ``--max-examples`` examples (image
    folders are sorted by class, so the first n would cover few classes)."""

    def eval_data(self, task: str, split: str) -> torch.utils.data.Dataset:
        ds = super().eval_data(task, split)
        n = self.args.max_examples
        if n is None or n >= len(ds):
            return ds
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
        return torch.utils.data.Subset(ds, order)


def load(args: Config) -> LoadedModel:
    """The CLIP classifier of ``args`` and the figures' hooks on it (evaluation as in vision/evaluate.py)."""
    setup = SubsetSetup(args)

    def calibration_batches(task: str):
        setup.use_task(task)  # as vision/finetune.py: <Task>Val with the training preprocessing
        return setup.loader(setup.dataset(task, "val", train_transform=True), args.calibration_batch_size)

    return LoadedModel(model=setup.classifier, names=setup.eligible + setup.dense, eligible=list(setup.eligible),
                       evaluator=lambda lin: make_evaluator(setup, linearized=lin), predictions=setup.predictions,
                       forward_fn=logits_forward, calibration_batches=calibration_batches)


VISION = AnalysisDomain(name=DOMAIN, runs=RUNS, settings=SETTINGS, check_data=check_eval_data, load=load)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compute (or skip) one figure; returns its numbers."""
    return analysis_main(VISION, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
