"""Tests for talos.io: atomic writers leave either the old or the new file, never a partial one."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from talos import io


def _leftovers(directory: Path, final_names: set[str]) -> list[str]:
    """Files in ``directory`` other than the expected ones (i.e. stray temp files)."""
    return sorted(p.name for p in directory.iterdir() if p.name not in final_names)


# ---------------------------------------------------------------- bytes / JSON
def test_atomic_write_bytes_creates_parents_and_content(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "blob.bin"
    io.atomic_write_bytes(target, b"\x00hello\xff")
    assert target.read_bytes() == b"\x00hello\xff"
    assert _leftovers(target.parent, {"blob.bin"}) == []


def test_atomic_write_bytes_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    io.atomic_write_bytes(target, b"old")
    io.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path, {"blob.bin"}) == []


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "blob.bin"
    io.atomic_write_bytes(target, b"old")

    def boom(fd: int) -> None:  # the crash happens after the data was written, before the rename
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        io.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"blob.bin"}) == []


def test_written_files_are_not_private(tmp_path: Path) -> None:
    # Temp files start as 0600; results must stay readable like any normally created file.
    target = tmp_path / "x.json"
    io.atomic_write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_json_round_trip_and_format(tmp_path: Path) -> None:
    obj = {"b": 1, "a": [1.5, None, True, False, "s"], "nested": {"z": 0.1, "y": -3}, "p": tmp_path / "x"}
    target = tmp_path / "sub" / "obj.json"
    io.atomic_write_json(target, obj)
    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"') < text.index('"nested"')  # sorted keys
    back = io.read_json(target)
    assert back == {**obj, "p": str(tmp_path / "x")}
    assert json.loads(text) == back
    assert _leftovers(target.parent, {"obj.json"}) == []


def test_json_unserialisable_does_not_clobber(tmp_path: Path) -> None:
    target = tmp_path / "obj.json"
    io.atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        io.atomic_write_json(target, {"bad": object()})
    assert io.read_json(target) == {"ok": 1}
    assert _leftovers(tmp_path, {"obj.json"}) == []


def test_read_json_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        io.read_json(tmp_path / "nope.json")


# ---------------------------------------------------------------- safetensors
def test_tensors_round_trip_with_metadata(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "w": base.t(),  # non-contiguous
        "tied": base,  # shares memory with "w"
        "h": torch.randn(5, dtype=torch.float64).to(torch.bfloat16),
        "i": torch.tensor([1, 2, 3], dtype=torch.int64),
        "s": torch.tensor(3.5),
    }
    target = tmp_path / "t" / "x.safetensors"
    io.save_tensors(target, tensors, metadata={"who": "me"})
    loaded, meta = io.load_tensors_with_metadata(target)
    assert meta == {"who": "me"}
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype
        assert torch.equal(loaded[k], t)
    assert set(io.load_tensors(target)) == set(tensors)
    assert _leftovers(target.parent, {"x.safetensors"}) == []


def test_load_tensors_without_metadata(tmp_path: Path) -> None:
    target = tmp_path / "x.safetensors"
    io.save_tensors(target, {"a": torch.ones(2)})
    _, meta = io.load_tensors_with_metadata(target)
    assert meta == {}


def test_save_tensors_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.safetensors"
    io.save_tensors(target, {"a": torch.ones(3)})

    def half_write(tensors, filename, metadata=None):  # writes garbage, then dies
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_tensors(target, {"a": torch.zeros(3)})
    assert torch.equal(io.load_tensors(target)["a"], torch.ones(3))
    assert _leftovers(tmp_path, {"x.safetensors"}) == []


def test_load_tensors_missing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        io.load_tensors(missing)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        io.load_tensors_with_metadata(missing)


def test_save_tensors_rejects_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        bad_meta = {"n": 1}
        io.save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)}, metadata=bad_meta)  # type: ignore[arg-type]


# ---------------------------------------------------------------- torch checkpoints
def test_torch_checkpoint_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "rng": torch.get_rng_state(),
    }
    target = tmp_path / "ckpt" / "checkpoint.pt"
    io.atomic_torch_save(target, state)
    back = io.torch_load(target)
    assert back["step"] == 7
    assert torch.equal(back["rng"], state["rng"])
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # the optimizer state is usable for resuming
    assert _leftovers(target.parent, {"checkpoint.pt"}) == []


def test_torch_save_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.pt"
    io.atomic_torch_save(target, {"step": 1})

    def half_write(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.atomic_torch_save(target, {"step": 2})
    monkeypatch.undo()
    assert io.torch_load(target) == {"step": 1}
    assert _leftovers(tmp_path, {"checkpoint.pt"}) == []


def test_torch_load_refuses_pickled_module(tmp_path: Path) -> None:
    target = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), target)  # a full pickled object, not just tensors
    with pytest.raises(pickle.UnpicklingError):
        io.torch_load(target)


def test_torch_load_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        io.torch_load(tmp_path / "nothing.pt")
