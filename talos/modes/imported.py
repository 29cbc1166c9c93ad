"""Imported task vectors: published fine-tuned checkpoints converted by an importer, never trained here."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings, setting
from .base import FinetuneMode, register_mode


@dataclass
class ImportSettings(Settings):
    """Whose published checkpoints the task vectors were converted from."""

    import_source: str | None = setting(None, "with --finetuning-mode imported: whose published checkpoints "
                                        "(<domain>/import_checkpoints.py)", kind=str)

    def check(self) -> None:
        super().check()
        if not self.import_source:
            raise ValueError("--finetuning-mode imported needs --import-source (the source the vectors came from)")


@register_mode
class Imported(FinetuneMode):
    """Imported: task vectors of published checkpoints (vision/import_checkpoints.py), one folder per source."""

    name = "imported"
    settings = ImportSettings
    trains = False
    training_settings = ("seed",)  # the schedule shaped someone else's fine-tuning, not the imported run folder

    def results_label(self, settings: ImportSettings) -> str:
        """``imported:<source>``: vectors of different sources stay apart in one results.json."""
        return f"imported:{settings.import_source}"

    def missing_hint(self, domain: str, task: str, settings: ImportSettings, model: str, save: str) -> str:
        return (f"import it: python {domain}/import_checkpoints.py --source {settings.import_source} "
                f"--model {model} --tasks {task} --save {save} (with the same --pretrained, --seed and "
                "--freeze-embeddings)")
