"""The single place that turns (domain, model, mode, task, hyperparameters) into on-disk run paths."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from talos.io import atomic_write_json

__all__ = ["hparams_hash", "canonical_json", "slug", "FinetuneRun", "EvalRun", "head_path"]

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_RESERVED_MODES = frozenset({"eval", "heads"})


def _canonical(value: Any, where: str) -> Any:
    """Reduce ``value`` to plain JSON types, rejecting anything whose encoding could be ambiguous."""
    # bool before int: bool is an int subclass but must stay true/false in the JSON.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"hparams keys must be str, got {k!r} at {where}")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"unsupported hparams value of type {type(value).__name__} at {where}: {value!r} "
        "(allowed: None, bool, int, float, str, Path, list/tuple, dict with str keys)"
    )


def canonical_json(hparams: Mapping[str, Any]) -> str:
    """The exact string that :func:`hparams_hash` hashes (sorted keys, no whitespace, repr floats)."""
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a mapping, got {type(hparams).__name__}")
    # json.dumps spells floats with float.__repr__ (shortest round-trip form), so 0.1 stays "0.1";
    # ensure_ascii pins the encoding of non-ASCII strings.
    return json.dumps(
        _canonical(hparams, "hparams"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )


def hparams_hash(hparams: Mapping[str, Any], length: int = 10) -> str:
    """First ``length`` hex chars of sha256 over the canonical JSON of ``hparams``.

    Key order does not matter; ``1`` and ``1.0`` are different values and hash differently.
    Changing this function orphans every stored result: the pinned hashes in the tests guard it.
    """
    if not 1 <= length <= 64:
        raise ValueError(f"length must be in [1, 64], got {length}")
    digest = hashlib.sha256(canonical_json(hparams).encode("utf-8")).hexdigest()
    return digest[:length]


def slug(name: str) -> str:
    """Filesystem-safe folder name for a model id: ``"ViT-B/32"`` -> ``"ViT-B__32"``."""
    if not isinstance(name, str) or not name:
        raise ValueError("cannot slug an empty name")
    out = _SLUG_UNSAFE.sub("_", name.replace("/", "__"))
    if out in (".", ".."):
        raise ValueError(f"name {name!r} would be a relative path component")
    return out


def _check_component(kind: str, value: str) -> str:
    """Validate a name used verbatim as one path component."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string, got {value!r}")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in value for s in seps) or "\0" in value:
        raise ValueError(f"{kind} {value!r} must not contain path separators")
    if value in (".", ".."):
        raise ValueError(f"{kind} {value!r} is not a valid folder name")
    return value


def _frozen_hparams(hparams: Mapping[str, Any]) -> Mapping[str, Any]:
    # A private read-only copy: mutating the caller's dict later must not move the run folder.
    return MappingProxyType(copy.deepcopy(dict(hparams)))


def _write_config(path: Path, base: dict[str, Any], extra: Mapping[str, Any] | None) -> Path:
    payload = dict(base)
    if extra:
        clash = sorted(set(extra) & set(payload))
        if clash:
            raise ValueError(f"extra config keys {clash} collide with reserved keys")
        payload.update(extra)
    atomic_write_json(path, payload)
    return path


@dataclass(frozen=True)
class FinetuneRun:
    """Folder of one fine-tuning run: ``root/domain/slug(model)/mode/task/<hparams hash>``."""

    root: Path | str
    domain: str
    model: str
    mode: str
    task: str
    # Equality/hashing go through ``hash`` (which is determined by hparams) so runs can key dicts.
    hparams: Mapping[str, Any] = field(compare=False)
    hash: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_component("domain", self.domain)
        slug(self.model)  # raises ValueError on an empty/unusable model name
        _check_component("mode", self.mode)
        if self.mode in _RESERVED_MODES:
            # These folders sit beside the mode folders (EvalRun, head_path): such a mode would mix them.
            raise ValueError(f"mode {self.mode!r} is reserved (reserved: {sorted(_RESERVED_MODES)})")
        _check_component("task", self.task)
        run_hash = hparams_hash(self.hparams)  # first, so bad hparams fail with a clear TypeError
        # Frozen dataclass: normalise fields through object.__setattr__.
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "hparams", _frozen_hparams(self.hparams))
        object.__setattr__(self, "hash", run_hash)

    @property
    def dir(self) -> Path:
        """The run folder."""
        return self.root / self.domain / slug(self.model) / self.mode / self.task / self.hash

    @property
    def mask(self) -> Path:
        """Sparse fine-tuning mask (safetensors)."""
        return self.dir / "mask.safetensors"

    @property
    def finetuned(self) -> Path:
        """Fine-tuned weights (safetensors)."""
        return self.dir / "finetuned.safetensors"

    @property
    def task_vector(self) -> Path:
        """Task vector written by :meth:`talos.task_vector.TaskVector.save`."""
        return self.dir / "task_vector.safetensors"

    @property
    def checkpoint(self) -> Path:
        """Resumable training state (model + optimizer + step)."""
        return self.dir / "checkpoint.pt"

    @property
    def config(self) -> Path:
        """config.json describing the run."""
        return self.dir / "config.json"

    @property
    def metrics(self) -> Path:
        """metrics.json with the run's final metrics."""
        return self.dir / "metrics.json"

    @property
    def calibration(self) -> Path:
        """calibration.json (mask calibration statistics)."""
        return self.dir / "calibration.json"

    def is_complete(self) -> bool:
        """True once both the task vector and the metrics files exist (existence only: the pipeline skips a run
        when :func:`talos.stages.run_complete` also finds them matching ``manifest.json``)."""
        return self.task_vector.is_file() and self.metrics.is_file()

    def write_config(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Atomically write config.json (domain/model/mode/task/hparams/hash + ``extra``); returns its path.

        ``extra`` keys are merged at top level; colliding with a reserved key raises ValueError.
        """
        base = {
            "domain": self.domain,
            "model": self.model,
            "mode": self.mode,
            "task": self.task,
            "hparams": dict(self.hparams),
            "hash": self.hash,
        }
        return _write_config(self.config, base, extra)


@dataclass(frozen=True)
class EvalRun:
    """Folder of one evaluation: ``root/domain/slug(model)/eval/protocol/<hparams hash>``."""

    root: Path | str
    domain: str
    model: str
    protocol: str
    hparams: Mapping[str, Any] = field(compare=False)
    hash: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_component("domain", self.domain)
        slug(self.model)
        _check_component("protocol", self.protocol)
        run_hash = hparams_hash(self.hparams)
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "hparams", _frozen_hparams(self.hparams))
        object.__setattr__(self, "hash", run_hash)

    @property
    def dir(self) -> Path:
        """The evaluation folder."""
        return self.root / self.domain / slug(self.model) / "eval" / self.protocol / self.hash

    @property
    def results(self) -> Path:
        """results.json."""
        return self.dir / "results.json"

    @property
    def config(self) -> Path:
        """config.json describing the evaluation."""
        return self.dir / "config.json"

    def write_config(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Atomically write config.json (domain/model/protocol/hparams/hash + ``extra``); returns its path."""
        base = {
            "domain": self.domain,
            "model": self.model,
            "protocol": self.protocol,
            "hparams": dict(self.hparams),
            "hash": self.hash,
        }
        return _write_config(self.config, base, extra)


def head_path(
    root: Path | str, domain: str, model: str, dataset: str, hparams: Mapping[str, Any]
) -> Path:
    """Cached zero-shot head: ``root/domain/slug(model)/heads/<dataset>_<hash>.safetensors``."""
    _check_component("domain", domain)
    _check_component("dataset", dataset)
    return Path(root) / domain / slug(model) / "heads" / f"{dataset}_{hparams_hash(hparams)}.safetensors"
