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

if __package__ in (None, ""):  # `python vision/finetune.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from talos import distributed as dist
from talos.calibration import format_mask_report, mask_report
from talos.io import atomic_write_json, load_tensors, read_json, save_tensors
from talos.modes import ModeContext, get_mode
from talos.runinfo import run_metadata, seed_everything
from talos.tracking import Tracker
from talos.train import TrainConfig, setup_trainable, train

from vision.args import parse_args
from vision.common import VisionSetup, finetune_run, load_task_vectors, logits_forward
from vision.models import lora_targets
from vision.datasets import check_datasets

logger = logging.getLogger("talos")


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or skip, or resume) one fine-tuning job; returns its metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, need_train_dataset=True, description=__doc__)
    args.device = dist.init_from_env(args.device)  # torchrun: join the process group, one GPU per rank
    main_rank = dist.is_main()
    task = args.train_dataset
    check_datasets([task], args.data_location)  # fail before loading any model
    mode = get_mode(args.finetuning_mode)
    if mode.source_mode is not None:  # e.g. posthoc evaluates standard task vectors: make sure they exist
        logger.info("%s reuses %s task vectors", mode.name, mode.source_mode)
        args.finetuning_mode = mode.source_mode
        mode = get_mode(mode.source_mode)
    run = finetune_run(args, task)
    if run.is_complete():
        logger.info("skip: %s already has its task vector (%s)", task, run.dir)
        return read_json(run.metrics)
    for req in mode.requires:  # e.g. LoTA reads the standard run's task vector: fail now, not after loading
        load_task_vectors(args, [task], mode=req)
    config = {"args": dict(vars(args)), "world_size": dist.world_size(),
              **run_metadata(list(argv) if argv is not None else None)}
    if main_rank:
        run.write_config(config)
    tracker = Tracker(args.wandb and main_rank, project=args.wandb_project, entity=args.wandb_entity,
                      name=f"{args.model}-{args.finetuning_mode}-{task}-{run.hash}", config=config,
                      group=f"{args.model}-{args.finetuning_mode}", dir=run.dir)
    seed_everything(args.seed)
    setup = VisionSetup(args)
    model = setup.use_task(task)

    def calib_batches():
        ds = setup.dataset(task, "val", train_transform=True)  # <Task>Val, training preprocessing
        return setup.loader(ds, args.calibration_batch_size)

    ctx = ModeContext(
        model, setup.eligible, dense=setup.dense, forward_fn=logits_forward, calibration_batches=calib_batches,
        sparsity=args.sparsity, rounds=args.calibration_rounds, soft_mask=args.soft_mask,
        fisher_target=args.fisher_target, fisher_draws=args.fisher_draws, max_batches=args.calibration_batches,
        seed=args.seed, progress=not args.no_progress,
        on_round=lambda r, d, m: tracker.log({"calibration/round": r, "calibration/density": d}),
        lora_targets=lora_targets, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_scaling=args.lora_scaling,
        load_task_vector=lambda m: load_task_vectors(args, [task], mode=m)[task],
    )

    # --- masks (calibration) ---------------------------------------------------------------------------
    masks = None
    if mode.sparse:
        if run.mask.exists():
            masks = load_tensors(run.mask)
            logger.info("loaded mask from %s", run.mask)
        else:
            masks = mode.masks(ctx)  # identical on every rank (Fisher sums are all-reduced)
            if main_rank:
                save_tensors(run.mask, masks)
                atomic_write_json(run.calibration, {"per_tensor": mask_report(masks)})
                logger.info("mask saved to %s\n%s", run.mask, format_mask_report(masks))

    # --- fine-tuning -----------------------------------------------------------------------------------
    theta0 = setup.trainable_state()
    state = mode.prepare(ctx, masks)
    train_set = setup.dataset(task, "train", train_transform=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, accumulation=args.num_grad_accumulation,
                      lr=args.lr, weight_decay=args.wd, warmup=args.warmup_length,
                      grad_clip=args.grad_clip if args.grad_clip > 0 else None, precision=args.precision,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers)

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x.to(setup.device, non_blocking=True)),
                                                 y.to(setup.device, non_blocking=True))

    summary = train(state.model, train_set, loss_fn, state.named_params, state.masks, cfg, dense=state.dense,
                    device=setup.device, checkpoint_path=run.checkpoint, on_log=lambda s, m: tracker.log(m, step=s),
                    progress=not args.no_progress, stop_after=args.stop_after)
    if summary.get("interrupted"):
        state.cleanup()
        return summary

    # --- artifacts -------------------------------------------------------------------------------------
    tv = state.task_vector()
    state.cleanup()
    metrics = {**summary, "task_vector_density": tv.density(), "task_vector_norm": tv.norm(),
               "trainable_entries": int(sum(p.numel() if state.masks is None or n not in state.masks
                                            else int(state.masks[n].sum()) for n, p in state.named_params))}
    if not main_rank:  # only rank 0 writes artifacts
        dist.barrier()
        return metrics
    save_tensors(run.finetuned, tv.apply_to({n: theta0[n] for n in tv.keys()}))
    tv.save(run.task_vector)
    atomic_write_json(run.metrics, metrics)  # written last: marks the run complete
    run.checkpoint.unlink(missing_ok=True)
    tracker.summary(metrics)
    tracker.finish()
    logger.info("done: %s (%d steps, loss %.4f, task-vector density %.4f)", run.dir, summary["steps"],
                summary["loss"], metrics["task_vector_density"])
    dist.barrier()
    return metrics


if __name__ == "__main__":
    main()
