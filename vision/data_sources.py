"""Where dataset files come from: resumable checked downloads, HF Hub files and parquet exports to image folders.

Used by ``vision/prepare_datasets.py``; nothing here knows a dataset's layout. Three primitives:

* :func:`download_url` -- HTTP(S) download into ``<dest>.part`` (resumed with a ``Range`` request after an
  interruption), progress bar, md5/sha256 check, then an atomic rename; a mismatch deletes the partial file.
* :func:`hub_file` / :func:`hub_parquet_files` -- files of a HF Hub *dataset* repo at a fixed revision through
  ``huggingface_hub`` (its own cache resumes and de-duplicates). Tests replace :data:`HUB` with a fake client.
* :func:`export_parquet` -- rows ``{image: {bytes, path}, label: int}`` of parquet files written as image files
  with their ORIGINAL bytes (no decode, no re-encode) into ``<out>/<class folder>/<file>``, labels mapped onto
  an official class list by name (the hub's ``ClassLabel`` names from the parquet schema metadata).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = [
    "ChecksumError", "download_url", "file_digest", "hub_file", "hub_parquet_files", "export_parquet",
    "parquet_label_names", "staging", "HUB", "normalize_name", "resumable_torchvision_downloads",
]

CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded file does not have the published checksum (the file is deleted).

    A ``RuntimeError`` like torchvision's own integrity error, so torchvision's mirror loops try the next mirror.
    """


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of ``path`` (``algorithm``: "md5" or "sha256"), read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, md5: str | None, sha256: str | None, url: str) -> None:
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected and file_digest(path, algorithm) != expected:
            got = file_digest(path, algorithm)
            path.unlink()
            raise ChecksumError(f"{url}: {algorithm} {got} != published {expected}; the download was deleted, "
                                f"re-run to fetch it again")


def _progress(total: int | None, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc, leave=False)


def download_url(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None,
                 timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part``; verify the checksum; return ``dest``.

    An existing ``dest`` is checked and kept. A server that ignores the ``Range`` header (status 200 instead
    of 206) restarts the file from byte 0 rather than appending a second copy.
    """
    dest = Path(dest)
    if dest.is_file():
        _check(dest, md5, sha256, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the partial file is already complete
            raise
        response = None
    if response is not None:
        with response:
            resumed = response.status == 206
            size = response.headers.get("Content-Length")
            total = (int(size) + (have if resumed else 0)) if size else None
            with open(part, "ab" if resumed else "wb") as f, _progress(total, have if resumed else 0, dest.name) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
        # http.client ends a dropped connection like a finished body: compare sizes, keep the part to resume.
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"{url}: connection dropped at {part.stat().st_size:,} of {total:,} bytes; "
                                  f"re-run to resume from {part}")
    _check(part, md5, sha256, url)
    os.replace(part, dest)
    return dest


@contextmanager
def resumable_torchvision_downloads() -> Iterator[None]:
    """Route torchvision's ``download_url`` (and so ``download_and_extract_archive``) through :func:`download_url`.

    torchvision restarts an interrupted download from byte 0; inside this block its archives resume instead,
    with the same md5 checks. (Google Drive downloads, PCAM's, keep torchvision's own path.)
    """
    import torchvision.datasets.utils as tv_utils

    original = tv_utils.download_url

    def resumable(url: str, root: str | os.PathLike, filename: str | os.PathLike | None = None,
                  md5: str | None = None, max_redirect_hops: int = 3) -> None:
        download_url(url, Path(root).expanduser() / (filename or os.path.basename(url)), md5=md5)

    tv_utils.download_url = resumable
    try:
        yield
    finally:
        tv_utils.download_url = original


# --------------------------------------------------------------------------------------------------
# HF Hub
# --------------------------------------------------------------------------------------------------
class _Hub:
    """The few ``huggingface_hub`` calls we make (a class so tests can swap in a local fake)."""

    def download(self, repo: str, filename: str, revision: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))

    def list_files(self, repo: str, revision: str) -> list[str]:
        from huggingface_hub import HfApi

        return list(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))


HUB = _Hub()


def hub_file(repo: str, filename: str, revision: str, *, md5: str | None = None) -> Path:
    """One file of dataset ``repo`` at ``revision`` (cached by huggingface_hub), checked against ``md5``."""
    path = HUB.download(repo, filename, revision)
    if md5 and file_digest(path, "md5") != md5:
        raise ChecksumError(f"hf://datasets/{repo}@{revision}/{filename}: md5 differs from the published {md5}")
    return path


#: The hub's automatic parquet conversion of every public dataset (``<config>/<split>/NNNN.parquet``).
PARQUET_EXPORT = "refs/convert/parquet"


def _shards(names: Sequence[str], split: str, config: str | None) -> list[str]:
    """``[<dir>/]<split>-*.parquet`` or ``<dir>/<split>/*.parquet`` names; ``<dir>`` must be ``config`` if given."""
    pattern = re.compile(rf"^(?:(?P<dir>.+)/)?(?:{re.escape(split)}-[^/]*|{re.escape(split)}/[^/]*)\.parquet$")
    shards = []
    for name in names:
        match = pattern.match(name)
        if match and (config is None or (match["dir"] or "").split("/")[0] == config):
            shards.append(name)
    return sorted(shards)


def hub_parquet_files(repo: str, revision: str, split: str, config: str | None = None) -> list[Path]:
    """The parquet shards of ``split`` at ``revision``, else in the hub's parquet conversion; sorted by name.

    Shards: ``data/<split>-*.parquet`` (``push_to_hub``), ``<config>/<split>-*.parquet`` or
    ``<config>/<split>/*.parquet`` (the conversion branch).
    """
    tried = []
    for rev in dict.fromkeys((revision, PARQUET_EXPORT)):
        try:
            shards = _shards(HUB.list_files(repo, rev), split, config)
        except Exception as e:  # noqa: BLE001 - a missing branch is one more place tried
            tried.append(f"{rev} ({type(e).__name__}: {e})")
            continue
        if shards:
            return [HUB.download(repo, n, rev) for n in shards]
        tried.append(f"{rev} (no parquet files for split {split!r})")
    raise FileNotFoundError(f"hf://datasets/{repo}{'/' + config if config else ''}: tried {'; '.join(tried)}")


# --------------------------------------------------------------------------------------------------
# Parquet -> image folders
# --------------------------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """Class names compared loosely: case, ``_``/``-``/``/``/spaces ignored (``"Annual_Crop"`` == ``"annual crop"``).

    SUN397's raw forms lose their letter folder: ``"/a/apartment_building/outdoor"`` and
    ``"a_apartment_building_outdoor"`` both become ``"apartment building outdoor"``.
    """
    n = re.sub(r"[\s_\-/]+", " ", name).strip().lower()
    letter = re.match(r"^([a-z]) (\1.*)$", n)
    return letter.group(2) if letter else n


def parquet_label_names(path: Path, column: str) -> list[str] | None:
    """The ``ClassLabel`` names of ``column`` stored by ``datasets`` in the parquet schema (None if absent)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return None
    feature = json.loads(raw).get("info", {}).get("features", {}).get(column, {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"P6", ".ppm"), (b"RIFF", ".webp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def _extension(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    raise ValueError(f"unknown image format (first bytes {data[:8]!r})")


def _label_map(hub_names: Sequence[str] | None, official: Sequence[str], n_seen: int,
               aliases: Sequence[str] = ()) -> list[int]:
    """hub label index -> official index, matched by name (or by ``aliases``, a second spelling of the official
    list in the same order); without hub names the orders must agree."""
    if hub_names is None:
        if n_seen > len(official):
            raise ValueError(f"labels reach {n_seen - 1} but the official list has {len(official)} classes")
        return list(range(len(official)))
    index = {normalize_name(n): i for i, n in enumerate(official)}
    index.update({normalize_name(n): i for i, n in enumerate(aliases) if normalize_name(n) not in index})
    if len({normalize_name(n) for n in official}) != len(official):
        raise ValueError("the official class list has names that only differ in case or separators")
    if len(hub_names) == len(official) and all(str(n).isdigit() for n in hub_names) and \
            not all(normalize_name(n) in index for n in hub_names):
        return [int(n) for n in hub_names]  # numbered classes ("00000".."00042"): the number is the label
    unknown = [n for n in hub_names if normalize_name(n) not in index]
    if unknown or len(hub_names) != len(official):
        raise ValueError(f"hub class names do not match the official list ({len(hub_names)} vs {len(official)}); "
                         f"unknown: {unknown[:5]}")
    return [index[normalize_name(n)] for n in hub_names]


def export_parquet(files: Sequence[Path], out: Path, official: Sequence[str], folder: Callable[[int], str], *,
                   image_column: str = "image", label_column: str = "label",
                   hub_names: Sequence[str] | None = None, aliases: Sequence[str] = ()) -> int:
    """Write every row of ``files`` to ``out/<folder(official label)>/<name>``; return the number written.

    ``name`` is the basename of the row's original ``path`` when the source kept it (so ImageFolder's
    file-name order is the original archive's), else ``<row:06d>`` plus the extension its bytes have.
    ``hub_names`` overrides the names read from the schema (sources that store labels without them);
    ``aliases`` is another accepted spelling of ``official`` (same order), e.g. EuroSAT's folder names.
    """
    import pyarrow.parquet as pq

    names = hub_names if hub_names is not None else parquet_label_names(Path(files[0]), label_column)
    written = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=[image_column, label_column]):
            mapping = _label_map(names, official, max(batch.column(1).to_pylist(), default=-1) + 1, aliases)
            written = _write_batch(batch.column(0).to_pylist(), batch.column(1).to_pylist(), out, folder,
                                   mapping, written)
    return written


def _write_batch(images: list, labels: list[int], out: Path, folder: Callable[[int], str], mapping: list[int],
                 written: int) -> int:
    """Write one record batch (see :func:`export_parquet`); returns the running count of rows written."""
    for image, label in zip(images, labels):
        data = image["bytes"] if isinstance(image, dict) else image
        original = image.get("path") if isinstance(image, dict) else None
        if not data:
            raise ValueError(f"row {written} has no image bytes (path {original!r}): not a self-contained copy")
        fname = os.path.basename(original) if original else f"{written:06d}{_extension(data)}"
        target = out / folder(mapping[int(label)]) / fname
        if target.exists():  # two rows with one file name: keep both, the second by row number
            target = target.with_name(f"{written:06d}_{fname}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written += 1
    return written


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A fresh temporary folder next to ``final``, renamed to ``final`` only if the block succeeds.

    ``final`` must not exist yet (nothing of the user's is ever replaced); on any error the temporary folder
    is removed, so no half-written dataset is left behind.
    """
    if final.exists():
        raise FileExistsError(f"{final} exists; move it away (or check it with --verify) before preparing again")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
