"""The ``imported`` mode: run folders named by the source (not a training schedule), never trained here."""
from __future__ import annotations

import argparse

import pytest

from talos import cli
from talos.modes import MODES, get_mode, run_order


def _args(**kw):
    base = dict(model="m", save="runs", finetuning_mode="imported", import_source="fusionbench", lr=1e-3,
                epochs=3, seed=0)
    return argparse.Namespace(**{**base, **kw})


def _hparams(args, task):
    return {"model": args.model, "mode": args.finetuning_mode, "task": task, "lr": args.lr, "epochs": args.epochs,
            "seed": args.seed}


def test_registered_but_not_trained():
    assert "imported" in MODES and not get_mode("imported").trains
    assert "imported" not in run_order() and set(run_order()) == set(MODES.names()) - {"imported"}


def test_run_folders_follow_the_source_not_the_schedule():
    runs = cli.RunPaths("toy", _hparams)
    a = runs.finetune(_args(), "A")
    assert dict(a.hparams) == {"model": "m", "mode": "imported", "task": "A", "seed": 0,
                               "import_source": "fusionbench"}
    assert runs.finetune(_args(lr=0.5, epochs=99), "A").hash == a.hash  # someone else's training
    assert runs.finetune(_args(import_source="tall_masks"), "A").hash != a.hash
    assert runs.finetune(_args(seed=1), "A").hash != a.hash  # θ0 of a random init depends on it
    std = runs.finetune(_args(finetuning_mode="standard"), "A")
    assert dict(std.hparams) == _hparams(_args(finetuning_mode="standard"), "A")  # other modes: unchanged
    with pytest.raises(ValueError, match="--import-source"):
        runs.finetune(_args(import_source=None), "A")


def test_a_missing_imported_vector_names_the_importer(tmp_path):
    runs = cli.RunPaths("vision", _hparams)
    with pytest.raises(FileNotFoundError, match=r"vision/import_checkpoints.py --source fusionbench --model m "
                                                r"--tasks A"):
        runs.task_vectors(_args(save=str(tmp_path)), ["A"])
