"""Every command-line flag of the vision scripts, the paper's presets, and validation before anything loads.

Example (paper setting, ViT-B/32 on Cars with TaLoS):
    python vision/finetune.py --model ViT-B-32 --finetuning-mode talos --train-dataset Cars \
        --data-location ~/data --save runs
Every flag is a field of a settings group (model, data and training here; method, evaluation, merges and runs
in talos.app.settings and the registered modes and merges). Presets are filled in only where a flag is left
unset (``--epochs``, ``--calibration-batch-size``, ``--precision``); the resolved values are written to each
run's config.json.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from talos.app import flags
from talos.app.checks import check_pretrained_file
from talos.app.runs import RunPaths
from talos.app.settings import StepSettings, merge_field
from talos.config import Settings, derived, setting

from .datasets import SUITES, epoch_preset, epoch_presets  # each dataset spec owns its epoch preset

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
TASKS = list(SUITES["8"])
CONTROL = "ImageNet"


@dataclass
class VisionModel(Settings):
    """The CLIP model: architecture, weights, activation, and which parameters fine-tuning may change."""

    model: str = setting("ViT-B-32", "open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14, any open_clip name, or the "
                         "test config talos-tiny-vit)")
    pretrained: str = setting("openai", "open_clip pretrained tag, a local checkpoint path, or 'none' for random init")
    activation: str = setting("auto", "MLP activation; auto = the pretrained tag's (QuickGELU for every openai tag, "
                              "as the weights were trained; open_clip >= 2.24 no longer forces it), else the "
                              "architecture's", choices=("auto", "quick_gelu", "gelu"))
    allow_activation_mismatch: bool = setting(False, "allow an explicit --activation that differs from the "
                                              "pretrained tag's", hashed=False)
    openclip_cachedir: str | None = setting(None, "where open_clip caches downloaded weights (default: "
                                            "$OPENCLIP_CACHEDIR)", hashed=False, kind=str)
    freeze_embeddings: bool = setting(False, "freeze class/positional embeddings and the output projection (exactly "
                                      "sparse task vectors); off reproduces the official code, which trains them "
                                      "densely")
    count_text_ln_final: bool = setting(True, "count the text tower's leftover ln_final (score 0, always kept) in "
                                        "the global kept count, as the official code's eligible set does (1,024 "
                                        "entries for ViT-B/32)")
    grad_checkpointing: bool = setting(False, "activation checkpointing of the image encoder's blocks "
                                       "(non-reentrant) in calibration and fine-tuning: less activation memory for "
                                       "more time (benchmarks/efficiency.py measures the trade); not for linear, "
                                       "which trains through the linearized model", hashed=False)
    pretrained_id: str | None = derived(None, "content hash of a --pretrained file (names the run instead of the path)")
    zero_score_entries: int = derived(0, "entries of the text tower's ln_final counted by calibration", hashed=False)

    def hashed(self) -> dict[str, Any]:
        """A checkpoint file is named by its content, not its path (replacing the file gives a new run)."""
        h = super().hashed()
        if h.pop("pretrained_id", None) is not None:
            h["pretrained"] = self.pretrained_id
        return h


@dataclass
class VisionData(Settings):
    """Task selection and data loading (the task is part of every run's name already)."""

    train_dataset: str | None = setting(None, "task to fine-tune on (finetune.py)", hashed=False, kind=str)
    eval_datasets: list = setting(list(TASKS), "comma-separated tasks to evaluate", hashed=False, csv=True, kind=list)
    control_dataset: str = setting(CONTROL, "control task of the negation protocol", hashed=False)
    data_location: str = setting(os.path.expanduser("~/data"), "root of the dataset folders", hashed=False)
    num_workers: int = setting(0, "data-loading worker processes (default: 4 on machines with more than 4 CPUs)",
                               low=0, hashed=False)
    eval_cache_mb: int = setting(2048, "evaluation splits that fit in this much memory (per process, float32 "
                                 "images) are decoded once per script instead of once per coefficient; 0 disables",
                                 low=0, hashed=False)


@dataclass
class VisionTraining(StepSettings):
    """The optimisation schedule of the vision scripts (``--batch-size`` is the whole optimizer step)."""

    batch_size: int = setting(128, "global batch of one optimizer step", low=1)
    num_grad_accumulation: int = setting(1, "micro-batches per optimizer step", low=1, hashed=False)
    lr: float = setting(1e-5, "learning rate", low=0.0, open_low=True)
    wd: float = setting(0.1, "decoupled weight decay", low=0.0)
    warmup_length: int = setting(500, "linear warm-up steps before cosine decay", low=0)
    epochs: int | None = setting(None, f"default: preset per dataset {epoch_presets()}", low=1, kind=int)

    def for_task(self, task: str) -> "VisionTraining":
        """The epochs preset of ``task`` filled in when ``--epochs`` is unset."""
        from dataclasses import replace

        return self if self.epochs is not None else replace(self, epochs=epoch_preset(task))


def _merge_defaults() -> dict[str, Any]:
    return {merge_field(m, hp): v for m, hps in MERGE_DEFAULTS.items() for hp, v in hps.items()}


def validate(cfg: flags.Config, need_train_dataset: bool = False) -> None:
    """Check every value and fill presets. Raises ValueError before any model or data is touched."""
    from talos.modes import MODES

    from .checkpoints import SOURCES
    from .models import check_model_name, official_leftover_entries, resolve_activation, text_ln_final_entries

    mode = MODES.get(cfg.finetuning_mode)
    check_model_name(cfg.model)
    cfg.pretrained_id = check_pretrained_file(cfg.pretrained)  # a file: its content hash (run hash)
    cfg.activation = resolve_activation(cfg.model, cfg.pretrained, cfg.activation, cfg.allow_activation_mismatch)
    cfg.zero_score_entries = text_ln_final_entries(cfg.model) if cfg.count_text_ln_final else 0
    if cfg.ties_extra_zeros == -1:
        cfg.ties_extra_zeros = official_leftover_entries(cfg.model)
    if cfg.import_source is not None and cfg.import_source not in SOURCES:
        raise ValueError(f"unknown --import-source {cfg.import_source!r}; valid choices: {', '.join(SOURCES.names())}")
    if (mode.name == "imported") != (cfg.import_source is not None):
        raise ValueError("--import-source is required with, and only with, --finetuning-mode imported "
                         f"(sources: {', '.join(SOURCES.names())})")
    if cfg.batch_size % cfg.num_grad_accumulation:
        raise ValueError("--batch-size must be a positive multiple of --num-grad-accumulation")
    if need_train_dataset and cfg.grad_checkpointing and mode.eval_linearized and mode.source_mode is None:
        raise ValueError(f"--grad-checkpointing cannot train {mode.name} (torch.func.jvp does not support "
                         "activation checkpointing); drop the flag for this mode")
    if need_train_dataset and cfg.epochs is None:
        if epoch_preset(cfg.train_dataset) is None:
            raise ValueError(f"no epoch preset for {cfg.train_dataset}; pass --epochs")
        cfg.epochs = epoch_preset(cfg.train_dataset)
    if cfg.calibration_batch_size is None:
        cfg.calibration_batch_size = CALIBRATION_BATCH_SIZE.get(cfg.model, DEFAULT_CALIBRATION_BATCH_SIZE)


def _check_task(name: str) -> Any:
    from .datasets import DATASETS, base_name

    return DATASETS.get(base_name(name))


DOMAIN = flags.Domain(
    name="vision", description="TaLoS vision (CLIP) task arithmetic", model=VisionModel, data=VisionData,
    training=VisionTraining, validate=validate, check_task=_check_task, suites=SUITES,
    defaults={"lora_scaling": "alpha", "wandb_project": "talos-vision", "eval_batch_size": 256,
              "openclip_cachedir": os.environ.get("OPENCLIP_CACHEDIR"),
              "num_workers": 4 if os.cpu_count() and os.cpu_count() > 4 else 0, **_merge_defaults()})
RUNS = RunPaths("vision")


build_parser = DOMAIN.parser  # (description=None) -> the parser shared by every script of the domain
parse_args = DOMAIN.parse  # (argv=None, *, need_train_dataset=False, description=None) -> the validated Config
