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

from talos import cli
from talos.analysis.drift import add_drift_flags

#: Fine-tuning epochs per dataset (task_vectors / paper setting).
EPOCHS = {
    "Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15, "SUN397": 14, "SVHN": 4,
    # the 14- and 20-task suites: TALL-masks' presets (github:nik-dim/tall_masks, finetune.py `epochs`)
    "CIFAR10": 6, "CIFAR100": 6, "STL10": 60, "Food101": 4, "Flowers102": 147, "FER2013": 10, "PCAM": 1,
    "OxfordIIITPet": 82, "RenderedSST2": 39, "EMNIST": 2, "FashionMNIST": 5, "KMNIST": 5,
    # generated datasets of the CPU smoke run
    "SynthShapes": 2, "SynthColors": 2, "SynthStripes": 2, "SynthControl": 2,
}
#: Calibration batch size per model (official code); other models default to 16.
CALIBRATION_BATCH_SIZE = {"ViT-B-32": 64, "ViT-B-16": 16, "ViT-L-14": 2}
DEFAULT_CALIBRATION_BATCH_SIZE = 16
#: Vision defaults of merge hyperparameters that differ by domain: TALL-masks / Consensus λ = 0.2, and the key
#: filters of the official vision scripts (talos/official_merges.py); TIES's extra_zeros -1 = the text tower's
#: leftover entries of the official encoder state dict (resolved from the model config).
MERGE_DEFAULTS = {"tall_masks": {"lam": 0.2}, "consensus": {"lam": 0.2},
                  "ties": {"extra_zeros": -1, "negation_keys": "attn,mlp,conv"},
                  "dare": {"skip_keys": "positional_embedding,text_projection,logit_scale",
                           "negation_keys": "attn,mlp,conv"},
                  "breadcrumbs": {"trim_keys": "attn,mlp,conv"}}
#: The eight tasks of the paper and the negation control.
TASKS = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"]
CONTROL = "ImageNet"


def build_parser(description: str = "TaLoS vision (CLIP) task arithmetic") -> argparse.ArgumentParser:
    """The single parser shared by all vision scripts."""
    from .checkpoints import SOURCES

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-32",
                   help="open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14, any open_clip name, or the test "
                        "config talos-tiny-vit)")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a local checkpoint path, or 'none' for random init")
    g.add_argument("--activation", default="auto", choices=["auto", "quick_gelu", "gelu"],
                   help="MLP activation; auto = the pretrained tag's (QuickGELU for every openai tag, as the "
                        "weights were trained; open_clip >= 2.24 no longer forces it), else the architecture's")
    g.add_argument("--allow-activation-mismatch", action="store_true",
                   help="allow an explicit --activation that differs from the pretrained tag's")
    g.add_argument("--openclip-cachedir", default=os.environ.get("OPENCLIP_CACHEDIR"),
                   help="where open_clip caches downloaded weights")
    g = cli.add_method_flags(
        p, fisher_target="logit",
        fisher_target_help="differentiate the drawn class's logit (official vision code) or its log-probability",
        draws_help="labels drawn per calibration example",
        calibration_batches_help="calibration batches per round (default: the whole <Task>Val split)",
        calibration_batch_size=None,
        calibration_batch_size_help=f"default: preset per model {CALIBRATION_BATCH_SIZE}, else "
                                    f"{DEFAULT_CALIBRATION_BATCH_SIZE}",
        lora_scaling="alpha",
        lora_scaling_help="LoRA update multiplier: alpha (the official vision code) or alpha / rank (peft)")
    g.add_argument("--import-source", default=None, choices=SOURCES.names(),
                   help="with --finetuning-mode imported: whose published checkpoints (vision/import_checkpoints.py)")
    g.add_argument("--freeze-embeddings", action="store_true",
                   help="freeze class/positional embeddings and the output projection (exactly sparse task "
                        "vectors); off reproduces the official code, which trains them densely")
    g.add_argument("--count-text-ln-final", action=argparse.BooleanOptionalAction, default=True,
                   help="count the text tower's leftover ln_final (score 0, always kept) in the global kept count, "
                        "as the official code's eligible set does (1,024 entries for ViT-B/32)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing of the image encoder's blocks (non-reentrant) in calibration "
                        "and fine-tuning: less activation memory for more time (benchmarks/efficiency.py measures "
                        "the trade); not for linear, which trains through the linearized model")
    g = p.add_argument_group("data")
    cli.add_task_flags(g, tasks=TASKS, control=CONTROL)
    g.add_argument("--data-location", default=os.path.expanduser("~/data"), help="root of the dataset folders")
    g.add_argument("--num-workers", type=int, default=4 if os.cpu_count() and os.cpu_count() > 4 else 0)
    g.add_argument("--eval-cache-mb", type=int, default=2048,
                   help="evaluation splits that fit in this much memory (per process, float32 images) are "
                        "decoded once per script instead of once per coefficient; 0 disables")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="global batch of one optimizer step")
    g.add_argument("--num-grad-accumulation", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--wd", type=float, default=0.1, help="decoupled weight decay")
    g.add_argument("--warmup-length", type=int, default=500, help="linear warm-up steps before cosine decay")
    g.add_argument("--epochs", type=int, default=None, help=f"default: preset per dataset {EPOCHS}")
    cli.add_step_flags(g)
    cli.add_evaluation_flags(p, eval_batch_size=256, merge_defaults=MERGE_DEFAULTS)
    cli.add_run_flags(p, wandb_project="talos-vision")
    add_drift_flags(p.add_argument_group("figures (fine-tuning)"))
    return p


def validate(args: argparse.Namespace, *, need_train_dataset: bool = False) -> argparse.Namespace:
    """Check every value and fill presets. Raises ValueError before any model or data is touched."""
    from .checkpoints import SOURCES
    from .datasets import DATASETS, base_name
    from .models import check_model_name, official_leftover_entries, resolve_activation, text_ln_final_entries

    mode = cli.validate_common(args, need_train_dataset=need_train_dataset,
                               check_task=lambda name: DATASETS.get(base_name(name)))
    check_model_name(args.model)
    args.pretrained_id = cli.check_pretrained_file(args.pretrained)  # a file: its content hash (run hash)
    args.activation = resolve_activation(args.model, args.pretrained, args.activation,
                                         args.allow_activation_mismatch)
    args.zero_score_entries = text_ln_final_entries(args.model) if args.count_text_ln_final else 0
    if args.merge_ties_extra_zeros == -1:
        args.merge_ties_extra_zeros = official_leftover_entries(args.model)
    if (mode.name == "imported") != (args.import_source is not None):
        raise ValueError("--import-source is required with, and only with, --finetuning-mode imported "
                         f"(sources: {', '.join(SOURCES.names())})")
    if args.batch_size < 1 or args.num_grad_accumulation < 1 or args.batch_size % args.num_grad_accumulation:
        raise ValueError("--batch-size must be a positive multiple of --num-grad-accumulation")
    if args.warmup_length < 0:
        raise ValueError("--warmup-length must be >= 0")
    if args.eval_cache_mb < 0:
        raise ValueError("--eval-cache-mb must be >= 0")
    if need_train_dataset and args.grad_checkpointing and mode.eval_linearized and mode.source_mode is None:
        raise ValueError(f"--grad-checkpointing cannot train {mode.name} (torch.func.jvp does not support "
                         "activation checkpointing); drop the flag for this mode")
    if need_train_dataset and args.epochs is None:
        if base_name(args.train_dataset) not in EPOCHS:
            raise ValueError(f"no epoch preset for {args.train_dataset}; pass --epochs")
        args.epochs = EPOCHS[base_name(args.train_dataset)]
    if args.epochs is not None and args.epochs < 1:
        raise ValueError("--epochs must be >= 1")
    if args.calibration_batch_size is None:
        args.calibration_batch_size = CALIBRATION_BATCH_SIZE.get(args.model, DEFAULT_CALIBRATION_BATCH_SIZE)
    cli.resolve_device(args)
    return args


def parse_args(argv: Sequence[str] | None = None, *, need_train_dataset: bool = False,
               description: str | None = None) -> argparse.Namespace:
    """Parse and validate; argparse-style exit (code 2) with the message on invalid values."""
    return cli.parse_validated(build_parser(description or "TaLoS vision (CLIP) task arithmetic"), validate, argv,
                               need_train_dataset=need_train_dataset)


def finetune_hparams(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The hyperparameters that define a fine-tuning run (its folder hash); eval scripts recompute them."""
    from talos.modes import MODES

    from .datasets import base_name

    epochs = args.epochs if args.epochs is not None else EPOCHS.get(base_name(task))
    return {
        "model": args.model, "pretrained": cli.pretrained_key(args), "activation": args.activation,
        "precision": args.precision, "mode": args.finetuning_mode, "task": task,
        "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd, "warmup": args.warmup_length,
        "epochs": epochs, "seed": args.seed, "grad_clip": args.grad_clip,
        "freeze_embeddings": bool(args.freeze_embeddings), **cli.method_hparams(args),
        **({"zero_score_entries": args.zero_score_entries} if MODES.get(args.finetuning_mode).needs_calibration
           else {}),
    }
