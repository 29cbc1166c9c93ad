"""The ``imported`` mode: run folders named by the source (not a training schedule), never trained here."""
from __future__ import annotations

import pytest

from talos.modes import MODES, get_mode, run_order
from tests.talos.app.test_flags import RUNS, _parse


def _cfg(*argv: str, **kw):
    cfg = _parse("--finetuning-mode", "imported", "--import-source", "fusionbench", *argv)
    return cfg.replace(**kw) if kw else cfg


def test_registered_but_not_trained():
    assert "imported" in MODES and not get_mode("imported").trains
    assert "imported" not in run_order() and set(run_order()) == set(MODES.names()) - {"imported"}


def test_run_folders_follow_the_source_not_the_schedule():
    a = RUNS.finetune(_cfg(), "A")
    assert dict(a.hparams) == {"mode": "imported", "task": "A", "import_source": "fusionbench"}
    assert RUNS.finetune(_cfg("--lr", "0.5", "--precision", "bf16"), "A").hash == a.hash  # someone else's training
    assert RUNS.finetune(_cfg(import_source="tall_masks"), "A").hash != a.hash
    assert RUNS.finetune(_cfg(seed=1), "A").hash != a.hash  # θ0 of a random init depends on it
    std = RUNS.finetune(_cfg("--lr", "0.5", finetuning_mode="standard"), "A")
    assert std.hparams["lr"] == 0.5 and "import_source" not in std.hparams  # other modes: their schedule
    with pytest.raises(SystemExit):
        _parse("--finetuning-mode", "imported")  # needs --import-source


def test_a_missing_imported_vector_names_the_importer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vision/import_checkpoints.py --source fusionbench --model m "
                                                r"--tasks A"):
        RUNS.__class__("vision").task_vectors(_cfg("--save", str(tmp_path)), ["A"])
