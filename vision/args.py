"""Every command-line flag of the vision scripts, the paper's presets, and validation before anything loads.

Example (paper setting, ViT-B/32 on Cars with TaLoS):
    python vision/finetune.py --model ViT-B-32 --finetuning-mode talos --train-dataset Cars \
        --data-location ~/data --save runs
Presets are filled in only where a flag is left unset (``--epochs``, ``--calibration-batch-size``,
``--precision``); the resolved values are written to each run's config.json.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

#: Fine-tuning epochs per dataset (task_vectors / paper setting).
EPOCHS = {
    "Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15, "SUN397": 14, "SVHN": 4,
    # generated datasets of the CPU smoke run
    "SynthShapes": 2, "SynthColors": 2, "SynthStripes": 2, "SynthControl": 2,
}
#: Calibration batch size per model (official code); other models default to 16.
CALIBRATION_BATCH_SIZE = {"ViT-B-32": 64, "ViT-B-16": 16, "ViT-L-14": 2}
DEFAULT_CALIBRATION_BATCH_SIZE = 16
#: Vision defaults of merge hyperparameters that differ by domain (TALL-masks / Consensus λ = 0.2).
MERGE_DEFAULTS = {"tall_masks": {"lam": 0.2}, "consensus": {"lam": 0.2}}
#: The eight tasks of the paper and the negation control.
TASKS = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"]
CONTROL = "ImageNet"


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def build_parser(description: str = "TaLoS vision (CLIP) task arithmetic") -> argparse.ArgumentParser:
    """The single parser shared by all vision scripts."""
    from talos.fisher import TARGETS
    from talos.merges import MERGES, add_merge_flags
    from talos.modes import MODES

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-32",
                   help="open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14, any open_clip name, or the test "
                        "config talos-tiny-vit)")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a local checkpoint path, or 'none' for random init")
    g.add_argument("--openclip-cachedir", default=os.environ.get("OPENCLIP_CACHEDIR"),
                   help="where open_clip caches downloaded weights")
    g = p.add_argument_group("method")
    g.add_argument("--finetuning-mode", default="talos", help=f"one of: {', '.join(MODES.names())}")
    g.add_argument("--sparsity", type=float, default=0.9, help="fraction of eligible entries frozen (sparse modes)")
    g.add_argument("--calibration-rounds", type=int, default=4, help="TaLoS calibration rounds R")
    g.add_argument("--soft-mask", type=float, default=0.1,
                   help="factor on dropped weights during later calibration rounds (0 = hard pruning)")
    g.add_argument("--fisher-target", default="logit", choices=list(TARGETS),
                   help="differentiate the drawn class's logit (official vision code) or its log-probability")
    g.add_argument("--fisher-draws", type=int, default=1, help="labels drawn per calibration example")
    g.add_argument("--calibration-batches", type=int, default=None,
                   help="calibration batches per round (default: the whole <Task>Val split)")
    g.add_argument("--calibration-batch-size", type=int, default=None,
                   help=f"default: preset per model {CALIBRATION_BATCH_SIZE}, else {DEFAULT_CALIBRATION_BATCH_SIZE}")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA / L-LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA / L-LoRA alpha")
    g.add_argument("--lora-scaling", default="alpha", choices=["alpha", "alpha_over_rank"],
                   help="LoRA update multiplier: alpha (the official vision code) or alpha / rank (peft)")
    g.add_argument("--freeze-embeddings", action="store_true",
                   help="freeze class/positional embeddings and the output projection (exactly sparse task "
                        "vectors); off reproduces the official code, which trains them densely")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing of the image encoder's blocks (non-reentrant) in calibration "
                        "and fine-tuning: less activation memory for more time (benchmarks/efficiency.py measures "
                        "the trade); not for modes trained through the linearized model (linear, llora)")
    g = p.add_argument_group("data")
    g.add_argument("--train-dataset", default=None, help="task to fine-tune on (finetune.py)")
    g.add_argument("--eval-datasets", type=_csv, default=list(TASKS), help="comma-separated tasks to evaluate")
    g.add_argument("--control-dataset", default=CONTROL, help="control task of the negation protocol")
    g.add_argument("--data-location", default=os.path.expanduser("~/data"), help="root of the dataset folders")
    g.add_argument("--num-workers", type=int, default=4 if os.cpu_count() and os.cpu_count() > 4 else 0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="global batch of one optimizer step")
    g.add_argument("--num-grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--wd", type=float, default=0.1, help="decoupled weight decay")
    g.add_argument("--warmup-length", type=int, default=500, help="linear warm-up steps before cosine decay")
    g.add_argument("--epochs", type=int, default=None, help=f"default: preset per dataset {EPOCHS}")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (<= 0 disables)")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=500, help="optimizer steps between resume checkpoints")
    g = p.add_argument_group("evaluation")
    g.add_argument("--n-eval-points", type=int, default=21, help="coefficients on [0, 1] for addition/negation")
    g.add_argument("--control-threshold", type=float, default=0.95,
                   help="negation keeps control accuracy >= this x zero-shot")
    g.add_argument("--merge", default="sum", help=f"one of: {', '.join(MERGES.names())}")
    g.add_argument("--eval-batch-size", type=int, default=256)
    add_merge_flags(p, MERGE_DEFAULTS)
    g = p.add_argument_group("runs")
    g.add_argument("--save", default="runs", help="root folder of all artifacts")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (works with WANDB_MODE=offline)")
    g.add_argument("--wandb-project", default="talos-vision")
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--results-json", default=None,
                   help="evaluation scripts also merge their results into this shared results.json")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop fine-tuning after this many optimizer steps, checkpoint kept (simulates an "
                        "interruption; rerun without it to resume)")
    return p


def validate(args: argparse.Namespace, *, need_train_dataset: bool = False) -> argparse.Namespace:
    """Check every value and fill presets. Raises ValueError before any model or data is touched."""
    from talos.merges import MERGES
    from talos.modes import MODES

    from .datasets import DATASETS, base_name
    from .models import check_model_name

    mode = MODES.get(args.finetuning_mode)  # unknown names raise with the valid list
    MERGES.get(args.merge)
    check_model_name(args.model)
    if not (0.0 < args.sparsity < 1.0):
        raise ValueError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.calibration_rounds < 1:
        raise ValueError("--calibration-rounds must be >= 1")
    if not (0.0 <= args.soft_mask <= 1.0):
        raise ValueError("--soft-mask must be in [0, 1]")
    if args.lora_rank < 1 or args.lora_alpha <= 0:
        raise ValueError("--lora-rank must be >= 1 and --lora-alpha > 0")
    if args.fisher_draws < 1:
        raise ValueError("--fisher-draws must be >= 1")
    if args.calibration_batches is not None and args.calibration_batches < 1:
        raise ValueError("--calibration-batches must be >= 1")
    if args.batch_size < 1 or args.num_grad_accumulation < 1 or args.batch_size % args.num_grad_accumulation:
        raise ValueError("--batch-size must be a positive multiple of --num-grad-accumulation")
    if args.lr <= 0 or args.wd < 0 or args.warmup_length < 0:
        raise ValueError("--lr must be > 0; --wd and --warmup-length >= 0")
    if args.n_eval_points < 2:
        raise ValueError("--n-eval-points must be >= 2")
    if not (0.0 < args.control_threshold <= 1.0):
        raise ValueError("--control-threshold must be in (0, 1]")
    for name in list(args.eval_datasets) + [args.control_dataset] + ([args.train_dataset] if args.train_dataset else []):
        DATASETS.get(base_name(name))
    if need_train_dataset and args.grad_checkpointing and mode.eval_linearized and mode.source_mode is None:
        raise ValueError(f"--grad-checkpointing cannot train {mode.name} (torch.func.jvp does not support "
                         "activation checkpointing); drop the flag for this mode")
    if need_train_dataset:
        if not args.train_dataset:
            raise ValueError("--train-dataset is required")
        if args.epochs is None:
            if base_name(args.train_dataset) not in EPOCHS:
                raise ValueError(f"no epoch preset for {args.train_dataset}; pass --epochs")
            args.epochs = EPOCHS[base_name(args.train_dataset)]
    if args.epochs is not None and args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    if args.calibration_batch_size is None:
        args.calibration_batch_size = CALIBRATION_BATCH_SIZE.get(args.model, DEFAULT_CALIBRATION_BATCH_SIZE)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if str(args.device).startswith("cuda") else "fp32"
    args.mode_sparse = mode.sparse
    return args


def parse_args(argv: Sequence[str] | None = None, *, need_train_dataset: bool = False,
               description: str | None = None) -> argparse.Namespace:
    """Parse and validate; argparse-style exit (code 2) with the message on invalid values."""
    parser = build_parser(description or "TaLoS vision (CLIP) task arithmetic")
    args = parser.parse_args(argv)
    try:
        return validate(args, need_train_dataset=need_train_dataset)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable


def finetune_hparams(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The hyperparameters that define a fine-tuning run (its folder hash); eval scripts recompute them."""
    from .datasets import base_name

    from talos.modes import MODES

    mode = MODES.get(args.finetuning_mode)
    epochs = args.epochs if args.epochs is not None else EPOCHS.get(base_name(task))
    h: dict[str, Any] = {
        "model": args.model, "pretrained": args.pretrained, "mode": args.finetuning_mode, "task": task,
        "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd, "warmup": args.warmup_length,
        "epochs": epochs, "seed": args.seed, "grad_clip": args.grad_clip,
        "freeze_embeddings": bool(args.freeze_embeddings),
    }
    if mode.sparse:
        h["sparsity"] = args.sparsity
    if mode.uses_lora:
        h.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_scaling=args.lora_scaling)
    if mode.needs_calibration:
        h.update(rounds=args.calibration_rounds, soft_mask=args.soft_mask, fisher_target=args.fisher_target,
                 fisher_draws=args.fisher_draws, calibration_batches=args.calibration_batches,
                 calibration_batch_size=args.calibration_batch_size)
    return h
