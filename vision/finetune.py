"""Fine-tune a CLIP image encoder on one task with a registered mode; save mask, weights and task vector.

    python vision/finetune.py --model ViT-B-32 --finetuning-mode talos --train-dataset Cars \
        --data-location ~/data --save runs [--wandb]

Stages skip themselves when their artifact exists (mask, then the task vector), and training resumes from
the run's checkpoint after an interruption.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python vision/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (vision/datasets.py would shadow HF `datasets`)

import torch

from talos import distributed as dist
from talos.analysis.drift import GradientDrift
from talos.rng import EpochLoader, SeededDataset
from talos.app.jobs import mode_context, start_finetune
from talos.stages import finetune_with_mode
from talos.train import TrainConfig

from vision.args import parse_args
from vision.common import RUNS, VisionSetup, logits_forward
from vision.datasets import check_datasets
from vision.models import lora_targets


def gradient_drift(args, setup: VisionSetup, task: str) -> GradientDrift | None:
    """Fig. 7's recorder (``--gradient-drift-every``): the true class's logit on a seeded random subset of
    ``--gradient-drift-examples`` <Task>Val images (evaluation preprocessing); None when off."""
    if not args.gradient_drift_every:
        return None
    ds = setup.dataset(task, "val")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.gradient_drift_examples]
    xs, ys = zip(*(ds[i] for i in order.tolist()))
    x, y = torch.stack(xs).to(setup.device), torch.tensor(ys, device=setup.device)
    return GradientDrift(lambda m: m(x)[torch.arange(len(y), device=setup.device), y], args.gradient_drift_every)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or skip, or resume) one fine-tuning job; returns its metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, need_train_dataset=True, description=__doc__)
    args = args.replace(device=dist.init_from_env(args.device))  # torchrun: join the process group, one GPU per rank
    task = args.train_dataset
    check_datasets([task], args.data_location)  # fail before loading any model
    job = start_finetune(args, runs=RUNS)
    args = job.cfg  # (posthoc fine-tunes its source mode)
    if job.done is not None:
        return job.done
    setup = VisionSetup(args)
    model = setup.use_task(task)

    def calib_batches():
        # <Task>Val with the training preprocessing; augmentations from calibration's own stream (per round
        # and example), so a loaded mask or another --num-workers leaves every later draw unchanged
        ds = SeededDataset(setup.dataset(task, "val", train_transform=True), args.seed, "calibration")
        return EpochLoader(lambda d: setup.loader(d, args.calibration_batch_size), ds)

    ctx = mode_context(job, runs=RUNS, model=model,
                       eligible=setup.eligible, dense=setup.dense, forward_fn=logits_forward,
                       calibration_batches=calib_batches, lora_targets=lora_targets,
                       zero_score_entries=args.zero_score_entries)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, accumulation=args.num_grad_accumulation,
                      lr=args.lr, weight_decay=args.wd, warmup=args.warmup_length,
                      grad_clip=args.grad_clip if args.grad_clip > 0 else None, precision=args.precision,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers)

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x.to(setup.device, non_blocking=True)),
                                                 y.to(setup.device, non_blocking=True))

    metrics = finetune_with_mode(run=job.run, mode=job.mode, ctx=ctx,
                                 train_set=setup.dataset(task, "train", train_transform=True), loss_fn=loss_fn,
                                 cfg=cfg, device=setup.device, tracker=job.tracker, progress=not args.no_progress,
                                 stop_after=args.stop_after, gradient_drift=gradient_drift(args, setup, task))
    job.tracker.finish()
    return metrics


if __name__ == "__main__":
    main()
