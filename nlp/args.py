"""Every command-line flag of the NLP scripts, the paper's settings as defaults, and validation before anything loads.

Example (paper setting, T5-base on QASC with TaLoS):
    python nlp/finetune.py --model t5-base --finetuning-mode talos --train-dataset qasc --save runs

Batches: ``--batch-size`` is the micro-batch of one forward pass and an optimizer step accumulates
``--num-grad-accumulation`` of them (paper: 64 x 16 = 1,024 examples per step), unlike the vision scripts
whose ``--batch-size`` is the whole step. The learning rate is constant (no warm-up), 75,000 steps.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

#: The seven tasks of the paper (T5 setting of TIES-Merging) and the negation control.
TASKS = ["qasc", "wiki_qa", "quartz", "paws", "story_cloze", "winogrande", "wsc"]
CONTROL = "rte"
#: NLP defaults of merge hyperparameters that differ by domain (TALL-masks / Consensus λ = 0.6).
MERGE_DEFAULTS = {"tall_masks": {"lam": 0.6}, "consensus": {"lam": 0.6}}


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def build_parser(description: str = "TaLoS NLP (T5 / causal LM) task arithmetic") -> argparse.ArgumentParser:
    """The single parser shared by all NLP scripts."""
    from talos.fisher import TARGETS
    from talos.merges import MERGES, add_merge_flags
    from talos.modes import MODES

    from .models import ATTN_IMPLEMENTATIONS, MODEL_ALIASES, TINY_MODELS

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="t5-base",
                   help=f"{', '.join(MODEL_ALIASES)}, any Hugging Face seq2seq or causal LM (hub id or local folder), "
                        f"or a tiny test config ({', '.join(TINY_MODELS)})")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer hub id or folder (default: the model's; required for the tiny configs)")
    g.add_argument("--cache-dir", default=os.environ.get("TALOS_HF_CACHE"),
                   help="Hugging Face cache for models and datasets (default: the library's)")
    g.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers attention kernel (both accept the packed choice masks)")
    g = p.add_argument_group("method")
    g.add_argument("--finetuning-mode", default="talos", help=f"one of: {', '.join(MODES.names())}")
    g.add_argument("--sparsity", type=float, default=0.9, help="fraction of eligible entries frozen (sparse modes)")
    g.add_argument("--calibration-rounds", type=int, default=4, help="TaLoS calibration rounds R")
    g.add_argument("--soft-mask", type=float, default=0.1,
                   help="factor on dropped weights during later calibration rounds (0 = hard pruning)")
    g.add_argument("--fisher-target", default="log_prob", choices=list(TARGETS),
                   help="differentiate the log-likelihood of the drawn answer choice (official nlp code) or its "
                        "summed log-likelihood itself (logit)")
    g.add_argument("--fisher-draws", type=int, default=1, help="answer choices drawn per calibration example")
    g.add_argument("--calibration-batches", type=int, default=None,
                   help="calibration batches per round (default: the whole validation split)")
    g.add_argument("--calibration-batch-size", type=int, default=32)
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA / L-LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA / L-LoRA alpha")
    g.add_argument("--lora-scaling", default="alpha_over_rank", choices=["alpha", "alpha_over_rank"],
                   help="LoRA update multiplier: alpha / rank (peft, as for T5) or alpha")
    g = p.add_argument_group("data")
    g.add_argument("--train-dataset", default=None, help="task to fine-tune on (finetune.py)")
    g.add_argument("--eval-datasets", type=_csv, default=list(TASKS), help="comma-separated tasks to evaluate")
    g.add_argument("--control-dataset", default=CONTROL, help="control task of the negation protocol")
    g.add_argument("--data-location", default=os.path.expanduser("~/data/nlp"),
                   help="optional local copies: <dir>/<task>/<split>.{jsonl,json,parquet,csv} override the hub")
    g.add_argument("--storycloze-dir", default=os.environ.get("STORYCLOZE_DIR"),
                   help="folder with the StoryCloze 2016 val/test CSV files (manual download)")
    g.add_argument("--max-seq-len", type=int, default=128, help="max tokens of a prompt and of an answer")
    g.add_argument("--num-workers", type=int, default=0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (micro-batch)")
    g.add_argument("--num-grad-accumulation", type=int, default=16, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="constant learning rate")
    g.add_argument("--wd", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument("--num-steps", type=int, default=75_000, help="optimizer steps")
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
    g.add_argument("--eval-batch-size", type=int, default=32)
    add_merge_flags(p, MERGE_DEFAULTS)
    g = p.add_argument_group("runs")
    g.add_argument("--save", default="runs", help="root folder of all artifacts")
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (works with WANDB_MODE=offline)")
    g.add_argument("--wandb-project", default="talos-nlp")
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--results-json", default=None,
                   help="evaluation scripts also merge their results into this shared results.json")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop fine-tuning after this many optimizer steps, checkpoint kept (simulates an "
                        "interruption; rerun without it to resume)")
    return p


def validate(args: argparse.Namespace, *, need_train_dataset: bool = False) -> argparse.Namespace:
    """Check every value and fill presets. Raises ValueError before any model weights or data load
    (the model check reads only the model's config)."""
    from talos.calibration import check_sparsity
    from talos.merges import MERGES
    from talos.modes import MODES

    from .datasets import TASKS as TASK_REGISTRY
    from .models import is_tiny

    mode = MODES.get(args.finetuning_mode)  # unknown names raise with the valid list
    MERGES.get(args.merge)
    check_sparsity(args.sparsity)
    if args.sparsity == 0.0:
        raise ValueError("--sparsity must be in (0, 1), got 0.0")
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
    if args.calibration_batch_size < 1 or args.eval_batch_size < 1:
        raise ValueError("--calibration-batch-size and --eval-batch-size must be >= 1")
    if args.batch_size < 1 or args.num_grad_accumulation < 1:
        raise ValueError("--batch-size and --num-grad-accumulation must be >= 1")
    if args.lr <= 0 or args.wd < 0:
        raise ValueError("--lr must be > 0 and --wd >= 0")
    if args.num_steps < 1:
        raise ValueError("--num-steps must be >= 1")
    if args.max_seq_len < 4:
        raise ValueError("--max-seq-len must be >= 4")
    if args.n_eval_points < 2:
        raise ValueError("--n-eval-points must be >= 2")
    if not (0.0 < args.control_threshold <= 1.0):
        raise ValueError("--control-threshold must be in (0, 1]")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError("--stop-after must be >= 1")
    if need_train_dataset and not args.train_dataset:
        raise ValueError("--train-dataset is required")
    tasks = list(args.eval_datasets) + [args.control_dataset] + ([args.train_dataset] if args.train_dataset else [])
    if not args.eval_datasets:
        raise ValueError("--eval-datasets is empty")
    for name in tasks:
        TASK_REGISTRY.get(name)  # unknown tasks raise with the valid list
    # StoryCloze's manual files are checked where they are read: the fine-tuned task, or the evaluated ones
    read = [args.train_dataset] if need_train_dataset else list(args.eval_datasets) + [args.control_dataset]
    if "story_cloze" in read and need_story_cloze(args):
        check_storycloze_dir(args.storycloze_dir)
    if is_tiny(args.model) and not args.tokenizer:
        raise ValueError(f"--model {args.model} is a tiny random-init config: pass --tokenizer <folder> "
                         "(e.g. the one python -m nlp.synthetic writes)")
    from .models import check_model_name

    args.model_kind = check_model_name(args.model, args.cache_dir)  # reads the config only
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if str(args.device).startswith("cuda") else "fp32"
    args.mode_sparse = mode.sparse
    return args


def need_story_cloze(args: argparse.Namespace) -> bool:
    """StoryCloze is read unless a local copy under --data-location replaces it."""
    from .datasets import TASKS as TASK_REGISTRY, local_path

    spec = TASK_REGISTRY.get("story_cloze")
    return any(local_path(args.data_location, "story_cloze", hs) is None for hs in spec.hub_splits())


def check_storycloze_dir(path: str | None) -> None:
    """ValueError unless ``path`` is a folder holding the StoryCloze 2016 validation and test files."""
    from .datasets import TASKS as TASK_REGISTRY, storycloze_files

    fetch = TASK_REGISTRY.get("story_cloze").fetch
    if not path:
        raise ValueError(f"task story_cloze needs --storycloze-dir (or STORYCLOZE_DIR). {fetch}")
    if not os.path.isdir(path):
        raise ValueError(f"--storycloze-dir {path} is not a folder. {fetch}")
    for split in ("validation", "test"):
        if not any(f.is_file() for f in storycloze_files(path, split)):
            names = ", ".join(f.name for f in storycloze_files(path, split))
            raise ValueError(f"--storycloze-dir {path} has no StoryCloze 2016 {split} file (looked for: {names}). "
                             f"{fetch}")


def parse_args(argv: Sequence[str] | None = None, *, need_train_dataset: bool = False,
               description: str | None = None) -> argparse.Namespace:
    """Parse and validate; argparse-style exit (code 2) with the message on invalid values."""
    parser = build_parser(description or "TaLoS NLP (T5 / causal LM) task arithmetic")
    args = parser.parse_args(argv)
    try:
        return validate(args, need_train_dataset=need_train_dataset)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable


def finetune_hparams(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The hyperparameters that define a fine-tuning run (its folder hash); eval scripts recompute them."""
    from talos.modes import MODES

    mode = MODES.get(args.finetuning_mode)
    h: dict[str, Any] = {
        "model": args.model, "tokenizer": args.tokenizer, "mode": args.finetuning_mode, "task": task,
        "batch_size": args.batch_size, "accumulation": args.num_grad_accumulation, "lr": args.lr, "wd": args.wd,
        "steps": args.num_steps, "seed": args.seed, "grad_clip": args.grad_clip, "max_seq_len": args.max_seq_len,
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
