"""Imported task vectors: published fine-tuned checkpoints converted by an importer, never trained here."""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from .base import FinetuneMode, register_mode

#: Training-schedule hyperparameters: they shaped someone else's fine-tuning, not the imported run folder.
SCHEDULE_KEYS = frozenset({"batch_size", "accumulation", "lr", "wd", "warmup", "epochs", "steps", "grad_clip",
                           "precision"})


@register_mode
class Imported(FinetuneMode):
    """Imported: task vectors of published checkpoints (vision/import_checkpoints.py), one folder per source."""

    name = "imported"
    trains = False

    def run_hparams(self, hparams: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
        """The model, θ0 and task settings without the training schedule, plus ``--import-source``."""
        source = getattr(args, "import_source", None)
        if not source:
            raise ValueError("--finetuning-mode imported needs --import-source (the source the vectors came from)")
        out = {k: v for k, v in hparams.items() if k not in SCHEDULE_KEYS}
        out["import_source"] = source
        return out

    def results_label(self, args: argparse.Namespace) -> str:
        """``imported:<source>``: vectors of different sources stay apart in one results.json."""
        return f"imported:{getattr(args, 'import_source', None)}"

    def missing_hint(self, domain: str, args: argparse.Namespace, task: str) -> str:
        return (f"import it: python {domain}/import_checkpoints.py --source {getattr(args, 'import_source', None)} "
                f"--model {args.model} --tasks {task} --save {args.save} (with the same --pretrained, --seed and "
                "--freeze-embeddings)")
