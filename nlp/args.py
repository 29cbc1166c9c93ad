"""Every command-line flag of the NLP scripts, the paper's settings as defaults, and validation before anything loads.

Example (paper setting, T5-base on QASC with TaLoS):
    python nlp/finetune.py --model t5-base --finetuning-mode talos --train-dataset qasc --save runs

Batches: ``--batch-size`` is the micro-batch of one forward pass and an optimizer step accumulates
``--num-grad-accumulation`` of them (paper: 64 x 16 = 1,024 examples per step), unlike the vision scripts
whose ``--batch-size`` is the whole step. The learning rate is constant (no warm-up), 75,000 steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from talos.app import flags
from talos.app.checks import check_model_dir
from talos.app.runs import RunPaths
from talos.app.settings import StepSettings, merge_field
from talos.config import Settings, derived, setting

#: The seven tasks of the paper (T5 setting of TIES-Merging) and the negation control.
TASKS = ["qasc", "wiki_qa", "quartz", "paws", "story_cloze", "winogrande", "wsc"]
CONTROL = "rte"
#: NLP defaults of merge hyperparameters that differ by domain (TALL-masks / Consensus λ = 0.6).
MERGE_DEFAULTS = {"tall_masks": {"lam": 0.6}, "consensus": {"lam": 0.6}}


@dataclass
class NLPModel(Settings):
    """The language model and its tokenizer."""

    model: str = setting("t5-base", "t5-small/base/large aliases, any Hugging Face seq2seq or causal LM (hub id or "
                         "local folder), or a tiny test config (nlp.models.TINY_MODELS)")
    tokenizer: str | None = setting(None, "tokenizer hub id or folder (default: the model's; required for the tiny "
                                    "configs)", kind=str)
    cache_dir: str | None = setting(None, "Hugging Face cache for models and datasets (default: $TALOS_HF_CACHE, "
                                    "else the library's)", hashed=False, kind=str)
    attn_implementation: str = setting("sdpa", "transformers attention kernel (both accept the packed choice masks)",
                                       choices=("sdpa", "eager"), hashed=False)
    model_id: str | None = derived(None, "content hash of a local model folder (names the run instead of the path)")
    model_kind: str | None = derived(None, "seq2seq or causal", hashed=False)

    def hashed(self) -> dict[str, Any]:
        """A local model folder is named by its content, not its path (replacing the weights gives a new run)."""
        h = super().hashed()
        if h.pop("model_id", None) is not None:
            h["model"] = self.model_id
        return h


@dataclass
class NLPData(Settings):
    """Task selection, data locations and sequence length."""

    train_dataset: str | None = setting(None, "task to fine-tune on (finetune.py)", hashed=False, kind=str)
    eval_datasets: list = setting(list(TASKS), "comma-separated tasks to evaluate", hashed=False, csv=True, kind=list)
    control_dataset: str = setting(CONTROL, "control task of the negation protocol", hashed=False)
    data_location: str = setting(os.path.expanduser("~/data/nlp"), "optional local copies: "
                                 "<dir>/<task>/<split>.{jsonl,json,parquet,csv} override the hub", hashed=False)
    storycloze_dir: str | None = setting(None, "folder with the StoryCloze 2016 val/test CSV files (manual download; "
                                         "default: $STORYCLOZE_DIR)", hashed=False, kind=str)
    max_seq_len: int = setting(128, "max tokens of a prompt and of an answer", low=4)
    num_workers: int = setting(0, "data-loading worker processes", low=0, hashed=False)


@dataclass
class NLPTraining(StepSettings):
    """The optimisation schedule: micro-batches accumulated into steps, a constant learning rate."""

    batch_size: int = setting(64, "examples per forward pass (micro-batch)", low=1)
    num_grad_accumulation: int = setting(16, "micro-batches per optimizer step", low=1)
    lr: float = setting(1e-4, "constant learning rate", low=0.0, open_low=True)
    wd: float = setting(0.0, "decoupled weight decay", low=0.0)
    num_steps: int = setting(75_000, "optimizer steps", low=1)


def validate(cfg: flags.Config, need_train_dataset: bool = False) -> None:
    """Check every value and fill presets. Raises ValueError before any model weights or data load
    (the model check reads only the model's config)."""
    from .models import check_model_name, is_tiny

    # StoryCloze's manual files are checked where they are read: the fine-tuned task, or the evaluated ones
    read = [cfg.train_dataset] if need_train_dataset else list(cfg.eval_datasets) + [cfg.control_dataset]
    if "story_cloze" in read and need_story_cloze(cfg):
        check_storycloze_dir(cfg.storycloze_dir)
    if is_tiny(cfg.model) and not cfg.tokenizer:
        raise ValueError(f"--model {cfg.model} is a tiny random-init config: pass --tokenizer <folder> "
                         "(e.g. the one python -m nlp.synthetic writes)")
    cfg.model_kind = check_model_name(cfg.model, cfg.cache_dir)  # reads the config only
    cfg.model_id = check_model_dir(cfg.model)  # a local folder: its weights' content hash (run hash)


def _check_task(name: str) -> Any:
    from .datasets import TASKS as TASK_REGISTRY

    return TASK_REGISTRY.get(name)


DOMAIN = flags.Domain(
    name="nlp", description="TaLoS NLP (T5 / causal LM) task arithmetic", model=NLPModel, data=NLPData,
    training=NLPTraining, validate=validate, check_task=_check_task, suites={str(len(TASKS)): TASKS},
    defaults={"lora_init": "kaiming", "calibration_batch_size": 32, "wandb_project": "talos-nlp",
              "eval_batch_size": 32, "cache_dir": os.environ.get("TALOS_HF_CACHE"),
              "storycloze_dir": os.environ.get("STORYCLOZE_DIR"),
              **{merge_field(m, hp): v for m, hps in MERGE_DEFAULTS.items() for hp, v in hps.items()}})
RUNS = RunPaths("nlp")


def need_story_cloze(cfg: flags.Config) -> bool:
    """StoryCloze is read unless a local copy under --data-location replaces it."""
    from .datasets import TASKS as TASK_REGISTRY, local_path

    spec = TASK_REGISTRY.get("story_cloze")
    return any(local_path(cfg.data_location, "story_cloze", hs) is None for hs in spec.hub_splits())


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


build_parser = DOMAIN.parser  # (description=None) -> the parser shared by every script of the domain
parse_args = DOMAIN.parse  # (argv=None, *, need_train_dataset=False, description=None) -> the validated Config
