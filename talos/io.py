"""Crash-safe (atomic) readers and writers for JSON, safetensors and torch checkpoint files."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import safetensors
import safetensors.torch
import torch

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "load_tensors_with_metadata",
    "atomic_torch_save",
    "torch_load",
]

def _read_umask() -> int:
    # mkstemp creates files with mode 0600; without fixing that, every result file
    # would be unreadable to collaborators sharing the results tree. The umask can
    # only be read by setting it, so do it once at import time.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so the rename itself survives a power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms where directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on clean exit fsync it and move it over ``path``.

    On any exception the temp file is removed and ``path`` is left exactly as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so os.replace is a rename within one filesystem (atomic).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def _require_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No such file: {str(p)!r}")
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); creates parent dirs."""
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    # numpy / 0-d torch scalars show up in metrics all the time; store them as plain numbers.
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return item()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON (sorted keys, trailing newline; paths become strings)."""
    # Serialise fully before touching the disk so an unserialisable object cannot clobber anything.
    text = json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`atomic_write_json` (or any JSON file)."""
    p = _require_file(path)
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _prepare_for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one buffer);
        # a private copy of the later ones keeps such state dicts saveable.
        ptr = t.untyped_storage().data_ptr()
        if ptr != 0 and t.numel() > 0:
            if ptr in seen_storages:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen_storages.add(ptr)
        out[name] = t
    return out


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically save ``tensors`` (moved to CPU, made contiguous) as a safetensors file."""
    prepared = _prepare_for_safetensors(tensors)
    meta: dict[str, str] | None = None
    if metadata is not None:
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str -> str, got {k!r}: {v!r}")
            meta[k] = v
    with _atomic_target(path) as tmp:
        # Looked up through the module so tests can substitute a failing serialiser.
        safetensors.torch.save_file(prepared, tmp, metadata=meta)


def load_tensors_with_metadata(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file; returns ``(tensors, metadata)`` (metadata is ``{}`` if absent)."""
    p = _require_file(path)
    tensors: dict[str, torch.Tensor] = {}
    with safetensors.safe_open(str(p), framework="pt", device=str(device)) as f:
        metadata = dict(f.metadata() or {})
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    return tensors, metadata


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load all tensors of a safetensors file onto ``device``."""
    return load_tensors_with_metadata(path, device=device)[0]


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` ``obj`` atomically (for resumable checkpoints holding optimizer state).

    Only store tensors and plain containers/numbers/strings: :func:`torch_load` refuses anything else.
    """
    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """Load a file written by :func:`atomic_torch_save`, always with ``weights_only=True``.

    Project rule: never unpickle arbitrary objects, so pickled modules/classes raise
    ``pickle.UnpicklingError``.
    """
    p = _require_file(path)
    return torch.load(p, map_location=map_location, weights_only=True)
