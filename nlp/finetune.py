"""Fine-tune a seq2seq or causal LM on one NLP task with a registered mode; save mask, weights and task vector.

    python nlp/finetune.py --model t5-base --finetuning-mode talos --train-dataset qasc --save runs [--wandb]

The loss is teacher-forced cross-entropy on the correct answer choice of the task's template-0 prompt; TaLoS
calibration scores the validation split by the log-likelihood of answer choices drawn from the model. Stages
skip themselves when their artifact exists (mask, then the task vector), and training resumes from the run's
checkpoint after an interruption.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # `python nlp/<script>.py`: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (nlp/datasets.py would shadow HF `datasets`)

import torch

from talos import distributed as dist
from talos.analysis.drift import GradientDrift
from talos.app.jobs import mode_context, start_finetune
from talos.stages import finetune_with_mode
from talos.train import TrainConfig

from nlp.args import parse_args
from nlp.common import RUNS, NLPSetup, data_kwargs
from nlp.datasets import check_tasks
from nlp.models import lora_targets
from nlp.scoring import answer_loss, choice_log_likelihoods


def gradient_drift(args, setup: NLPSetup, task: str) -> GradientDrift | None:
    """Fig. 7's recorder (``--gradient-drift-every``): the correct answer's log-likelihood on the first
    ``--gradient-drift-examples`` validation examples; None when off."""
    if not args.gradient_drift_every:
        return None
    batch = setup.collate(setup.examples(task, "val")[:args.gradient_drift_examples])

    def probe(model):
        scores = choice_log_likelihoods(model, batch)  # [B, C]
        return scores[torch.arange(len(scores)), batch["labels"].to(scores.device)]

    return GradientDrift(probe, args.gradient_drift_every)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or skip, or resume) one fine-tuning job; returns its metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, need_train_dataset=True, description=__doc__)
    args = args.replace(device=dist.init_from_env(args.device))  # torchrun: join the process group, one GPU per rank
    task = args.train_dataset
    check_tasks([task], splits=("train", "val"), **data_kwargs(args))  # fail before loading any model
    job = start_finetune(args, runs=RUNS)
    args = job.cfg  # (posthoc fine-tunes its source mode)
    if job.done is not None:
        return job.done
    setup = NLPSetup(args)
    ctx = mode_context(
        job, runs=RUNS, model=setup.model, eligible=setup.eligible,
        dense=[], forward_fn=choice_log_likelihoods, lora_targets=lora_targets,
        calibration_batches=lambda: setup.batches(task, "val", args.calibration_batch_size))
    # an optimizer step sees batch_size x accumulation examples; the lr is constant (paper-notes §1.4)
    cfg = TrainConfig(steps=args.num_steps, batch_size=args.batch_size * args.num_grad_accumulation,
                      accumulation=args.num_grad_accumulation, lr=args.lr, weight_decay=args.wd, warmup=0,
                      schedule="constant", grad_clip=args.grad_clip if args.grad_clip > 0 else None,
                      precision=args.precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      num_workers=args.num_workers)
    metrics = finetune_with_mode(run=job.run, mode=job.mode, ctx=ctx, train_set=setup.examples(task, "train"),
                                 loss_fn=answer_loss, cfg=cfg, device=setup.device, collate_fn=setup.train_collate,
                                 tracker=job.tracker, progress=not args.no_progress, stop_after=args.stop_after,
                                 gradient_drift=gradient_drift(args, setup, task))
    job.tracker.finish()
    return metrics


if __name__ == "__main__":
    main()
