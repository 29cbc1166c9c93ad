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

from talos import cli
from talos.analysis.drift import add_drift_flags

#: The seven tasks of the paper (T5 setting of TIES-Merging) and the negation control.
TASKS = ["qasc", "wiki_qa", "quartz", "paws", "story_cloze", "winogrande", "wsc"]
CONTROL = "rte"
#: NLP defaults of merge hyperparameters that differ by domain (TALL-masks / Consensus λ = 0.6).
MERGE_DEFAULTS = {"tall_masks": {"lam": 0.6}, "consensus": {"lam": 0.6}}


def build_parser(description: str = "TaLoS NLP (T5 / causal LM) task arithmetic") -> argparse.ArgumentParser:
    """The single parser shared by all NLP scripts."""
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
    g.add_argument("--attn-implementation", default="sdpa", choices=list(ATTN_IMPLEMENTATIONS),
                   help="transformers attention kernel (both accept the packed choice masks)")
    cli.add_method_flags(
        p, fisher_target="logit",
        fisher_target_help="differentiate the drawn answer choice's summed token log-likelihood itself (logit: "
                           "the official nlp code) or its log-softmax over the answer choices (log_prob)",
        draws_help="answer choices drawn per calibration example",
        calibration_batches_help="calibration batches per round (default: the whole validation split)",
        calibration_batch_size=32, calibration_batch_size_help=None,
        lora_scaling="alpha_over_rank",
        lora_scaling_help="LoRA update multiplier: alpha / rank (peft, as for T5) or alpha",
        lora_init="kaiming",
        lora_init_help="draw of the LoRA A factor: kaiming (peft's, which the official nlp L-LoRA uses) or xavier")
    g = p.add_argument_group("data")
    cli.add_task_flags(g, tasks=TASKS, control=CONTROL)
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
    cli.add_step_flags(g)
    cli.add_evaluation_flags(p, eval_batch_size=32, merge_defaults=MERGE_DEFAULTS)
    cli.add_run_flags(p, wandb_project="talos-nlp")
    add_drift_flags(p.add_argument_group("figures (fine-tuning)"))
    return p


def validate(args: argparse.Namespace, *, need_train_dataset: bool = False) -> argparse.Namespace:
    """Check every value and fill presets. Raises ValueError before any model weights or data load
    (the model check reads only the model's config)."""
    from .datasets import TASKS as TASK_REGISTRY
    from .models import check_model_name, is_tiny

    cli.validate_common(args, need_train_dataset=need_train_dataset, check_task=TASK_REGISTRY.get)
    if args.batch_size < 1 or args.num_grad_accumulation < 1:
        raise ValueError("--batch-size and --num-grad-accumulation must be >= 1")
    if args.num_steps < 1:
        raise ValueError("--num-steps must be >= 1")
    if args.max_seq_len < 4:
        raise ValueError("--max-seq-len must be >= 4")
    # StoryCloze's manual files are checked where they are read: the fine-tuned task, or the evaluated ones
    read = [args.train_dataset] if need_train_dataset else list(args.eval_datasets) + [args.control_dataset]
    if "story_cloze" in read and need_story_cloze(args):
        check_storycloze_dir(args.storycloze_dir)
    if is_tiny(args.model) and not args.tokenizer:
        raise ValueError(f"--model {args.model} is a tiny random-init config: pass --tokenizer <folder> "
                         "(e.g. the one python -m nlp.synthetic writes)")
    args.model_kind = check_model_name(args.model, args.cache_dir)  # reads the config only
    args.model_id = cli.check_model_dir(args.model)  # a local folder: its weights' content hash (run hash)
    cli.resolve_device(args)
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
    return cli.parse_validated(build_parser(description or "TaLoS NLP (T5 / causal LM) task arithmetic"), validate,
                               argv, need_train_dataset=need_train_dataset)


def finetune_hparams(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The hyperparameters that define a fine-tuning run (its folder hash); eval scripts recompute them."""
    return {
        "model": getattr(args, "model_id", None) or args.model, "tokenizer": args.tokenizer,
        "mode": args.finetuning_mode, "task": task,
        "batch_size": args.batch_size, "accumulation": args.num_grad_accumulation, "lr": args.lr, "wd": args.wd,
        "steps": args.num_steps, "seed": args.seed, "grad_clip": args.grad_clip, "max_seq_len": args.max_seq_len,
        "precision": args.precision,
        **cli.method_hparams(args),
    }
