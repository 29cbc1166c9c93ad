"""Crash-safe (atomic) readers and writers for JSON, safetensors and torch checkpoint files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
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
    "ArtifactError",
    "file_sha256",
    "record_artifact",
    "check_artifact",
    "forget_artifact",
    "RunLock",
    "locked_dir",
    "remove_stale_temps",
]


class ArtifactError(ValueError):
    """An artifact that cannot be trusted or read; the message names the file and what to do."""

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str | None = None) -> None:
        self.path, self.problem = Path(path), problem
        fix = fix or "delete it and rerun the command that wrote it (it will be rebuilt)"
        super().__init__(f"{self.path}: {problem}; {fix}")


class UnsafeFileError(ArtifactError, pickle.UnpicklingError):
    """A torch file holding pickled objects (refused: only tensors and plain containers are loaded)."""

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
    """Read a JSON file written by :func:`atomic_write_json` (or any JSON file); :class:`ArtifactError`
    naming the file when it is not valid JSON."""
    p = _require_file(path)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(p, f"not valid JSON ({e})") from None


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
    try:
        with safetensors.safe_open(str(p), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ArtifactError(p, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
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
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file, without torch's weights_only advice
        if isinstance(e, pickle.UnpicklingError) and "weights_only" in str(e):
            raise UnsafeFileError(p, "holds pickled objects other than tensors and plain containers, which are "
                                  "never unpickled", "delete it and rerun the command that wrote it") from None
        raise ArtifactError(p, f"cannot be read as a checkpoint: it is truncated or corrupt ({type(e).__name__})") \
            from None


# ----------------------------------------------------------------------------------------------------------
# Content hashes and manifests: every artifact of a run folder is listed with its size and sha256 in
# ``manifest.json``, and a stage trusts an existing artifact only when it matches.
# ----------------------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_cache_file() -> Path:
    root = os.environ.get("TALOS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "talos")
    return Path(root) / "file_hashes.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file's bytes, computed once and cached (``$TALOS_CACHE_DIR/file_hashes.json``,
    default ``~/.cache/talos``) keyed by real path + size + mtime, so multi-GB weights are read once."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache is only a cache: recompute
    if key in cache:
        return cache[key]
    digest = _sha256_of(p)
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{p}|")}
    cache[key] = digest
    with contextlib.suppress(OSError):  # a read-only home must not stop a run
        atomic_write_json(cache_file, cache)
    return digest


def _read_manifest(directory: Path) -> dict[str, Any]:
    m = directory / MANIFEST
    if not m.is_file():
        return {}
    try:
        return dict(json.loads(m.read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return {}  # an unreadable manifest trusts nothing: every stage recomputes


def record_artifact(path: str | os.PathLike[str]) -> None:
    """Add (or refresh) ``path``'s size and sha256 in the ``manifest.json`` of its folder."""
    p = Path(path)
    entry = {"size": p.stat().st_size, "sha256": _sha256_of(p)}
    with locked_dir(p.parent):  # shared folders (heads/) take updates from several processes
        files = _read_manifest(p.parent)
        files[p.name] = entry
        atomic_write_json(p.parent / MANIFEST, {"files": files})


def forget_artifact(path: str | os.PathLike[str]) -> None:
    """Drop ``path`` from its folder's manifest (before deleting or rewriting it)."""
    p = Path(path)
    if not (p.parent / MANIFEST).is_file():
        return
    with locked_dir(p.parent):
        files = _read_manifest(p.parent)
        if p.name in files:
            del files[p.name]
            atomic_write_json(p.parent / MANIFEST, {"files": files})


def check_artifact(path: str | os.PathLike[str], *, legacy_ok: bool = False) -> str | None:
    """None when ``path`` matches its manifest entry, else why not (missing, unlisted, size, hash).

    ``legacy_ok``: a folder without any manifest (written before manifests existed, or by hand) passes."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    files = _read_manifest(p.parent)
    entry = files.get(p.name)
    if entry is None:
        if legacy_ok and not (p.parent / MANIFEST).exists():
            return None
        return f"not listed in {p.parent / MANIFEST}"
    size = p.stat().st_size
    if size != entry.get("size"):
        return f"size {size} bytes, manifest says {entry.get('size')} (truncated or replaced)"
    if _sha256_of(p) != entry.get("sha256"):
        return "content hash differs from the manifest (corrupted or replaced)"
    return None


# ----------------------------------------------------------------------------------------------------------
# Locks: one writer per run folder, locked read-modify-write for shared files.
# ----------------------------------------------------------------------------------------------------------
def remove_stale_temps(directory: str | os.PathLike[str], name: str | None = None) -> int:
    """Delete temp files a killed writer left in ``directory`` (all, or those of target file ``name``); call
    only while holding the lock that every writer of those files takes. Returns how many were removed."""
    n = 0
    for t in Path(directory).glob(f".{name}.*.tmp" if name else ".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            t.unlink()
            n += 1
    return n


class RunLock:
    """Exclusive ``flock`` on ``<dir>/.lock`` holding the owner's PID; released on :meth:`release` or when the
    process dies (the kernel drops it), so a killed run never leaves a stale lock."""

    def __init__(self, directory: str | os.PathLike[str], *, wait: bool = False) -> None:
        import fcntl

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / ".lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise RuntimeError(f"{self.dir} is in use by another process (PID {pid}); wait for it to finish "
                               "or stop it, then rerun") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        remove_stale_temps(self.dir)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def locked_dir(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Block until this process holds an exclusive ``flock`` on ``directory`` itself (no file is created);
    for read-modify-write of shared files such as ``results.json``."""
    import fcntl

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
