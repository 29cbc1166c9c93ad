"""Tests for talos.paths: pinned hparams hashes and the exact on-disk layout of runs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from talos.io import read_json
from talos.paths import EvalRun, FinetuneRun, hparams_hash, head_path, slug

VISION_HP = {"model": "ViT-B-32", "mode": "talos", "sparsity": 0.9, "lr": 1e-05, "epochs": 35, "seed": 0}
NLP_HP = {
    "model": "google/t5-v1_1-base",
    "mode": "full",
    "lr": 0.0001,
    "batch_size": 32,
    "steps": 2000,
    "seed": 1,
    "optim": {"name": "adamw", "betas": [0.9, 0.999], "wd": 0.1},
}


# ---------------------------------------------------------------- hashing
@pytest.mark.parametrize(
    ("hparams", "expected"),
    [
        (VISION_HP, "fefb2bfe0f"),
        (NLP_HP, "f982924c48"),
        ({}, "44136fa355"),  # sha256("{}")
    ],
)
def test_pinned_hashes(hparams: dict, expected: str) -> None:
    # These strings name folders holding real results: if this test fails, old runs are orphaned.
    assert hparams_hash(hparams) == expected


def test_hash_length() -> None:
    full = hparams_hash(VISION_HP, length=64)
    assert len(full) == 64 and full.startswith("fefb2bfe0f")
    assert hparams_hash(VISION_HP, length=4) == "fefb"
    with pytest.raises(ValueError):
        hparams_hash(VISION_HP, length=0)


def test_hash_ignores_key_order_at_every_level() -> None:
    reordered = dict(reversed(list(NLP_HP.items())))
    reordered["optim"] = {"wd": 0.1, "betas": [0.9, 0.999], "name": "adamw"}
    assert hparams_hash(reordered) == hparams_hash(NLP_HP)


def test_hash_changes_with_values() -> None:
    base = hparams_hash(VISION_HP)
    assert hparams_hash({**VISION_HP, "seed": 1}) != base
    assert hparams_hash({**VISION_HP, "lr": 1.00001e-05}) != base
    assert hparams_hash({**VISION_HP, "extra": None}) != base
    assert hparams_hash({**NLP_HP, "optim": {**NLP_HP["optim"], "wd": 0.0}}) != hparams_hash(NLP_HP)
    # Types are part of the value: 1, 1.0, True and "1" are four different settings.
    assert len({hparams_hash({"x": v}) for v in (1, 1.0, True, "1")}) == 4


def test_hash_normalises_paths_and_tuples() -> None:
    assert hparams_hash({"data": Path("/data/x"), "betas": (0.9, 0.999)}) == hparams_hash(
        {"data": "/data/x", "betas": [0.9, 0.999]}
    )


def test_hash_float_spelling_is_shortest_repr() -> None:
    # 0.1 is hashed as the text "0.1" (not 0.1000000000000000055...), compact JSON with sorted keys.
    expected = hashlib.sha256(b'{"a":1e-05,"lr":0.1}').hexdigest()[:10]
    assert hparams_hash({"lr": 0.1, "a": 1e-05}) == expected
    assert hparams_hash({"lr": 1 / 10}) == hparams_hash({"lr": 0.1})
    assert hparams_hash({"lr": 0.1 + 0.2}) != hparams_hash({"lr": 0.3})


@pytest.mark.parametrize(
    "bad", [{"x": {1, 2}}, {"x": object()}, {"x": b"bytes"}, {1: "int key"}, {"x": {"y": [set()]}}]
)
def test_hash_rejects_unsupported_types(bad: dict) -> None:
    with pytest.raises(TypeError):
        hparams_hash(bad)


# ---------------------------------------------------------------- slug
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ViT-B/32", "ViT-B__32"),
        ("google/t5-v1_1-base", "google__t5-v1_1-base"),
        ("ViT-L-14@336px", "ViT-L-14_336px"),
        ("a b\\c:d", "a_b_c_d"),
        ("plain.name_1-2", "plain.name_1-2"),
    ],
)
def test_slug(name: str, expected: str) -> None:
    assert slug(name) == expected


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_slug_rejects_unusable_names(bad: str) -> None:
    with pytest.raises(ValueError):
        slug(bad)


# ---------------------------------------------------------------- layouts
def test_finetune_run_layout(tmp_path: Path) -> None:
    run = FinetuneRun(tmp_path, "vision", "ViT-B/32", "talos", "DTD", VISION_HP)
    expected_dir = Path("vision/ViT-B__32/talos/DTD/fefb2bfe0f")
    assert run.dir == tmp_path / expected_dir
    names = ("mask", "finetuned", "task_vector", "checkpoint", "config", "metrics", "calibration")
    rel = {name: getattr(run, name).relative_to(tmp_path) for name in names}
    assert rel == {
        "mask": expected_dir / "mask.safetensors",
        "finetuned": expected_dir / "finetuned.safetensors",
        "task_vector": expected_dir / "task_vector.safetensors",
        "checkpoint": expected_dir / "checkpoint.pt",
        "config": expected_dir / "config.json",
        "metrics": expected_dir / "metrics.json",
        "calibration": expected_dir / "calibration.json",
    }
    # A str root behaves like a Path root.
    assert FinetuneRun(str(tmp_path), "vision", "ViT-B/32", "talos", "DTD", VISION_HP).dir == run.dir


def test_finetune_run_is_value_like(tmp_path: Path) -> None:
    hp = dict(VISION_HP)
    a = FinetuneRun(tmp_path, "vision", "ViT-B/32", "talos", "DTD", hp)
    b = FinetuneRun(tmp_path, "vision", "ViT-B/32", "talos", "DTD", dict(reversed(list(hp.items()))))
    assert a == b and hash(a) == hash(b)
    assert a != FinetuneRun(tmp_path, "vision", "ViT-B/32", "talos", "DTD", {**hp, "seed": 1})
    hp["seed"] = 123  # mutating the caller's dict later must not move the run
    assert a.dir == b.dir
    with pytest.raises(AttributeError):
        a.task = "Cars"  # type: ignore[misc]


def test_finetune_run_is_complete(tmp_path: Path) -> None:
    run = FinetuneRun(tmp_path, "nlp", "google/t5-v1_1-base", "full", "rte", NLP_HP)
    assert not run.is_complete()
    run.task_vector.parent.mkdir(parents=True)
    run.task_vector.write_bytes(b"x")
    assert not run.is_complete()
    run.metrics.write_text("{}")
    assert run.is_complete()


def test_finetune_run_write_config(tmp_path: Path) -> None:
    hp = {**VISION_HP, "data_root": Path("/data"), "betas": (0.9, 0.98)}
    run = FinetuneRun(tmp_path, "vision", "ViT-B/32", "talos", "DTD", hp)
    path = run.write_config({"git": "abc123"})
    assert path == run.config
    cfg = read_json(run.config)
    assert cfg == {
        "domain": "vision",
        "model": "ViT-B/32",
        "mode": "talos",
        "task": "DTD",
        "hparams": {**VISION_HP, "data_root": "/data", "betas": [0.9, 0.98]},
        "hash": run.dir.name,
        "git": "abc123",
    }
    # The stored hparams reproduce the folder name.
    assert hparams_hash(cfg["hparams"]) == run.dir.name
    with pytest.raises(ValueError):
        run.write_config({"hash": "forged"})


def test_eval_run_layout(tmp_path: Path) -> None:
    hp = {"tasks": ["DTD", "Cars"], "merge": "sum", "alpha": 0.3}
    run = EvalRun(tmp_path, "vision", "ViT-B/32", "task_addition", hp)
    expected_dir = Path("vision/ViT-B__32/eval/task_addition") / hparams_hash(hp)
    assert run.dir.relative_to(tmp_path) == expected_dir
    assert run.results.relative_to(tmp_path) == expected_dir / "results.json"
    assert run.config.relative_to(tmp_path) == expected_dir / "config.json"
    run.write_config()
    assert read_json(run.config)["protocol"] == "task_addition"


def test_head_path(tmp_path: Path) -> None:
    hp = {"templates": "openai", "pretrained": "openai"}
    assert head_path(tmp_path, "vision", "ViT-B/32", "DTD", hp) == (
        tmp_path / "vision" / "ViT-B__32" / "heads" / f"DTD_{hparams_hash(hp)}.safetensors"
    )


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "args",
    [
        ("", "ViT-B/32", "talos", "DTD"),
        ("vision", "", "talos", "DTD"),
        ("vision", "ViT-B/32", "", "DTD"),
        ("vision", "ViT-B/32", "talos", ""),
        ("vision", "ViT-B/32", "ta/los", "DTD"),
        ("vision", "ViT-B/32", "talos", "a/b"),
        ("vision", "ViT-B/32", "talos", "a\\b"),
        ("vision", "ViT-B/32", "talos", ".."),
        ("vi/sion", "ViT-B/32", "talos", "DTD"),
        ("vision", "ViT-B/32", "eval", "DTD"),  # would land inside the eval tree
        ("vision", "ViT-B/32", "heads", "DTD"),
    ],
)
def test_finetune_run_validation(tmp_path: Path, args: tuple[str, str, str, str]) -> None:
    with pytest.raises(ValueError):
        FinetuneRun(tmp_path, *args, hparams={})


def test_eval_run_and_head_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EvalRun(tmp_path, "vision", "ViT-B/32", "task/addition", {})
    with pytest.raises(ValueError):
        EvalRun(tmp_path, "vision", "ViT-B/32", "", {})
    with pytest.raises(ValueError):
        head_path(tmp_path, "vision", "ViT-B/32", "sub/DTD", {})
    with pytest.raises(ValueError):
        head_path(tmp_path, "vision", "", "DTD", {})


def test_run_rejects_unsupported_hparams(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        FinetuneRun(tmp_path, "vision", "ViT-B/32", "talos", "DTD", {"x": object()})
