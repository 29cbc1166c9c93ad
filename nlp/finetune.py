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

if __package__ in (None, ""):  # `python nlp/<script>.py` from the repository root
    # the script's folder must not be on the path: nlp/datasets.py would shadow Hugging Face `datasets`
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from talos import distributed as dist
from talos.io import read_json
from talos.modes import ModeContext, get_mode
from talos.pipeline import finetune_with_mode
from talos.runinfo import run_metadata, seed_everything
from talos.tracking import Tracker
from talos.train import TrainConfig

from nlp.args import parse_args
from nlp.common import NLPSetup, data_kwargs, finetune_run, load_task_vectors
from nlp.datasets import check_tasks
from nlp.models import lora_targets
from nlp.scoring import answer_loss, choice_log_likelihoods

logger = logging.getLogger("talos")


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or skip, or resume) one fine-tuning job; returns its metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, need_train_dataset=True, description=__doc__)
    args.device = dist.init_from_env(args.device)  # torchrun: join the process group, one GPU per rank
    task = args.train_dataset
    mode = get_mode(args.finetuning_mode)
    if mode.source_mode is not None:  # e.g. posthoc evaluates standard task vectors: make sure they exist
        logger.info("%s reuses %s task vectors", mode.name, mode.source_mode)
        args.finetuning_mode = mode.source_mode
        mode = get_mode(mode.source_mode)
    check_tasks([task], splits=("train", "val"), **data_kwargs(args))  # fail before loading any model
    run = finetune_run(args, task)
    if run.is_complete():
        logger.info("skip: %s already has its task vector (%s)", task, run.dir)
        return read_json(run.metrics)
    for req in mode.requires:  # e.g. LoTA reads the standard run's task vector: fail now, not after loading
        load_task_vectors(args, [task], mode=req)
    config = {"args": dict(vars(args)), "world_size": dist.world_size(),
              **run_metadata(list(argv) if argv is not None else None)}
    if dist.is_main():
        run.write_config(config)
    tracker = Tracker(args.wandb and dist.is_main(), project=args.wandb_project, entity=args.wandb_entity,
                      name=f"{args.model}-{args.finetuning_mode}-{task}-{run.hash}", config=config,
                      group=f"{args.model}-{args.finetuning_mode}", dir=run.dir)
    seed_everything(args.seed)
    setup = NLPSetup(args)
    ctx = ModeContext(
        setup.model, setup.eligible, dense=[], forward_fn=choice_log_likelihoods,
        calibration_batches=lambda: setup.batches(task, "val", args.calibration_batch_size),
        sparsity=args.sparsity, rounds=args.calibration_rounds, soft_mask=args.soft_mask,
        fisher_target=args.fisher_target, fisher_draws=args.fisher_draws, max_batches=args.calibration_batches,
        seed=args.seed, progress=not args.no_progress,
        on_round=lambda r, d, m: tracker.log({"calibration/round": r, "calibration/density": d}),
        lora_targets=lora_targets, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_scaling=args.lora_scaling,
        load_task_vector=lambda m: load_task_vectors(args, [task], mode=m)[task],
    )
    # an optimizer step sees batch_size x accumulation examples; the lr is constant (paper-notes §1.4)
    cfg = TrainConfig(steps=args.num_steps, batch_size=args.batch_size * args.num_grad_accumulation,
                      accumulation=args.num_grad_accumulation, lr=args.lr, weight_decay=args.wd, warmup=0,
                      schedule="constant", grad_clip=args.grad_clip if args.grad_clip > 0 else None,
                      precision=args.precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      num_workers=args.num_workers)
    metrics = finetune_with_mode(run=run, mode=mode, ctx=ctx, train_set=setup.examples(task, "train"),
                                 loss_fn=answer_loss, cfg=cfg, device=setup.device, collate_fn=setup.train_collate,
                                 tracker=tracker, progress=not args.no_progress, stop_after=args.stop_after)
    tracker.finish()
    return metrics


if __name__ == "__main__":
    main()
