"""Task vectors (tau = theta_ft - theta_0): arithmetic, application to weights, and compact sparse storage."""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, ItemsView, Iterable, Iterator, KeysView, Mapping

import numpy as np
import safetensors
import torch

from talos.io import load_tensors_with_metadata, save_tensors

__all__ = ["TaskVector", "FILE_FORMAT", "FILE_VERSION"]

FILE_FORMAT = "talos.task_vector"
FILE_VERSION = 1

# Same-width integer dtypes used to look at raw float bits: "nonzero" for storage means any bit set,
# so -0.0 and NaN payloads survive a save/load round trip bit for bit.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_NAMES_IN_ERROR = 8


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMES_IN_ERROR])
    more = len(keys) - _MAX_NAMES_IN_ERROR
    return shown + (f", ... (+{more} more)" if more > 0 else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in task vector file")
    return dtype


def _bits_view(flat: torch.Tensor) -> torch.Tensor | None:
    """The tensor reinterpreted as same-width integers, or None when no such view exists."""
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    bits_dtype = _BITS_DTYPE.get(flat.element_size())
    if bits_dtype is None:
        return None
    try:
        return flat.view(bits_dtype)
    except RuntimeError:  # dtypes torch refuses to reinterpret (e.g. sub-byte types)
        return None


class TaskVector:
    """A task vector: parameter name -> tensor holding ``theta_ft - theta_0``.

    Arithmetic (``+``, ``-``, unary ``-``, scalar ``*`` and ``/``, ``sum([...])``) always returns a new
    object and never modifies its operands; operands must have identical keys and shapes.
    """

    def __init__(self, vector: Mapping[str, torch.Tensor]) -> None:
        """Wrap ``vector`` (the dict is copied, the tensors are not)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in vector.items():
            if not isinstance(name, str):
                raise TypeError(f"task vector keys must be str, got {type(name).__name__}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"task vector entry {name!r} is a {type(t).__name__}, not a tensor")
            out[name] = t
        self.vector: dict[str, torch.Tensor] = out

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        keys: Iterable[str] | None = None,
    ) -> TaskVector:
        """``finetuned - pretrained`` for ``keys`` (default: every floating-point tensor of ``pretrained``).

        The difference is stored in the pretrained tensor's dtype, except that float16/bfloat16
        are widened to float32: a difference of nearby low-precision weights would lose most of its
        bits if rounded back to 16 bits. With default keys, the floating-point key sets of both state
        dicts must agree (an extra fine-tuned parameter would otherwise be silently dropped).
        Raises ValueError naming missing keys or mismatched shapes.
        """
        if keys is None:
            chosen = [k for k, t in pretrained.items() if t.is_floating_point()]
            extra = [k for k, t in finetuned.items() if t.is_floating_point() and k not in pretrained]
            if extra:
                raise ValueError(
                    f"finetuned has floating-point keys absent from pretrained: {_names(extra)} "
                    "(pass keys= explicitly to ignore them)"
                )
        else:
            chosen = list(keys)
            missing_pre = [k for k in chosen if k not in pretrained]
            if missing_pre:
                raise ValueError(f"keys missing from pretrained: {_names(missing_pre)}")
            not_float = [k for k in chosen if not pretrained[k].is_floating_point()]
            if not_float:
                raise ValueError(f"keys are not floating-point tensors: {_names(not_float)}")
        missing_ft = [k for k in chosen if k not in finetuned]
        if missing_ft:
            raise ValueError(f"keys missing from finetuned: {_names(missing_ft)}")
        bad_shape = [k for k in chosen if pretrained[k].shape != finetuned[k].shape]
        if bad_shape:
            details = "; ".join(
                f"{k!r}: {tuple(pretrained[k].shape)} vs {tuple(finetuned[k].shape)}"
                for k in sorted(bad_shape)[:_MAX_NAMES_IN_ERROR]
            )
            raise ValueError(f"shape mismatch between pretrained and finetuned: {details}")

        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for k in chosen:
                pre = pretrained[k].detach()
                dtype = torch.float32 if pre.dtype in _LOW_PRECISION else pre.dtype
                ft = finetuned[k].detach().to(device=pre.device, dtype=dtype)
                out[k] = ft - pre.to(dtype)
        return cls(out)

    # ------------------------------------------------------------------ mapping-like access
    def keys(self) -> KeysView[str]:
        """Parameter names, in insertion order."""
        return self.vector.keys()

    def items(self) -> ItemsView[str, torch.Tensor]:
        """(name, tensor) pairs."""
        return self.vector.items()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.vector[key]

    def __contains__(self, key: object) -> bool:
        return key in self.vector

    def __iter__(self) -> Iterator[str]:
        return iter(self.vector)

    def __len__(self) -> int:
        return len(self.vector)

    def __repr__(self) -> str:
        return f"TaskVector(tensors={len(self)}, numel={self.numel()})"

    # ------------------------------------------------------------------ arithmetic
    def _check_compatible(self, other: TaskVector, op: str) -> None:
        mine, theirs = set(self.vector), set(other.vector)
        if mine != theirs:
            parts = []
            if mine - theirs:
                parts.append(f"only in left operand: {_names(mine - theirs)}")
            if theirs - mine:
                parts.append(f"only in right operand: {_names(theirs - mine)}")
            raise ValueError(f"cannot {op} task vectors with different keys ({'; '.join(parts)})")
        bad = [k for k in self.vector if self.vector[k].shape != other.vector[k].shape]
        if bad:
            raise ValueError(f"cannot {op} task vectors: shape mismatch for {_names(bad)}")

    def __add__(self, other: Any) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_compatible(other, "add")
        with torch.no_grad():
            return TaskVector({k: t + other.vector[k] for k, t in self.vector.items()})

    def __radd__(self, other: Any) -> TaskVector:
        # Lets the builtin sum() start from its default 0.
        if isinstance(other, numbers.Number) and other == 0:
            return self.clone()
        return NotImplemented

    def __sub__(self, other: Any) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_compatible(other, "subtract")
        with torch.no_grad():
            return TaskVector({k: t - other.vector[k] for k, t in self.vector.items()})

    def __neg__(self) -> TaskVector:
        with torch.no_grad():
            return TaskVector({k: -t for k, t in self.vector.items()})

    def __mul__(self, scalar: Any) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        with torch.no_grad():
            return TaskVector({k: t * scalar for k, t in self.vector.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        with torch.no_grad():
            return TaskVector({k: t / scalar for k, t in self.vector.items()})

    # ------------------------------------------------------------------ application
    def apply_to(self, state_dict: Mapping[str, torch.Tensor], coef: float = 1.0) -> dict[str, torch.Tensor]:
        """A new state dict equal to ``state_dict + coef * tau`` on tau's keys.

        The sum is computed in at least float32 (float64 stays float64) and cast back to each
        state-dict tensor's dtype. Other keys are passed through as the same tensor objects; the
        input dict and its tensors are never modified. ``coef == 0`` returns exact copies of the
        inputs (no float round trip that could flip ``-0.0``). Raises ValueError if a tau key is
        missing from ``state_dict``, is not floating-point there, or has a different shape.
        """
        missing = [k for k in self.vector if k not in state_dict]
        if missing:
            raise ValueError(f"task vector keys missing from state dict: {_names(missing)}")
        bad_shape = [k for k, t in self.vector.items() if state_dict[k].shape != t.shape]
        if bad_shape:
            raise ValueError(f"shape mismatch between task vector and state dict: {_names(bad_shape)}")
        not_float = [k for k in self.vector if not state_dict[k].is_floating_point()]
        if not_float:
            raise ValueError(f"state dict entries are not floating-point: {_names(not_float)}")

        out = dict(state_dict)
        with torch.no_grad():
            for k, tau in self.vector.items():
                base = state_dict[k]
                if coef == 0:
                    out[k] = base.detach().clone()
                    continue
                compute = torch.promote_types(base.dtype, torch.float32)
                summed = base.detach().to(compute) + coef * tau.detach().to(device=base.device, dtype=compute)
                out[k] = summed.to(base.dtype)
        return out

    # ------------------------------------------------------------------ statistics
    def dot(self, other: TaskVector) -> float:
        """Inner product over all entries (float64 accumulation)."""
        self._check_compatible(other, "dot")
        total = 0.0
        with torch.no_grad():
            for k, t in self.vector.items():
                o = other.vector[k].to(device=t.device, dtype=torch.float64)
                total += float(torch.sum(t.to(torch.float64) * o))
        return total

    def norm(self) -> float:
        """L2 norm over all entries (float64 accumulation)."""
        total = 0.0
        with torch.no_grad():
            for t in self.vector.values():
                t64 = t.to(torch.float64)
                total += float(torch.sum(t64 * t64))
        return math.sqrt(total)

    def nnz(self) -> int:
        """Number of numerically nonzero entries (``-0.0`` counts as zero, NaN as nonzero)."""
        return sum(int(torch.count_nonzero(t)) for t in self.vector.values())

    def numel(self) -> int:
        """Total number of entries."""
        return sum(t.numel() for t in self.vector.values())

    def density(self) -> float:
        """Fraction of nonzero entries, ``nnz() / numel()`` (0.0 for an empty vector)."""
        n = self.numel()
        return self.nnz() / n if n else 0.0

    # ------------------------------------------------------------------ conversion
    def to(self, *args: Any, **kwargs: Any) -> TaskVector:
        """A new TaskVector with ``Tensor.to(*args, **kwargs)`` applied to every tensor (device/dtype)."""
        return TaskVector({k: t.to(*args, **kwargs) for k, t in self.vector.items()})

    def clone(self) -> TaskVector:
        """A deep copy (tensors cloned)."""
        return TaskVector({k: t.detach().clone() for k, t in self.vector.items()})

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically save as safetensors, each tensor sparse (bitmask + nonzero values) when smaller.

        Bit-exact: "nonzero" means any bit set, so ``-0.0`` and NaN payloads round-trip.
        Layout: dense tensors under ``dense::<name>``; sparse ones as ``mask::<name>`` (uint8,
        numpy.packbits of the flattened occupancy) and ``values::<name>`` (original dtype); the
        metadata holds format/version and a JSON manifest of name/format/shape/dtype in key order.
        """
        tensors: dict[str, torch.Tensor] = {}
        manifest: list[dict[str, Any]] = []
        for name, t in self.vector.items():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
            bits = _bits_view(flat)
            stored_sparse = False
            if bits is not None and flat.numel() > 0:
                occupied = bits != 0
                nnz = int(occupied.sum())
                sparse_bytes = (flat.numel() + 7) // 8 + nnz * flat.element_size()
                if sparse_bytes < flat.numel() * flat.element_size():
                    packed = np.packbits(occupied.numpy())
                    tensors[f"mask::{name}"] = torch.from_numpy(packed)
                    # Gather through the integer view so values are copied as raw bits.
                    tensors[f"values::{name}"] = bits[occupied].view(t.dtype)
                    entry["format"] = "sparse"
                    stored_sparse = True
            if not stored_sparse:
                tensors[f"dense::{name}"] = t.detach()
                entry["format"] = "dense"
            manifest.append(entry)
        metadata = {
            "format": FILE_FORMAT,
            "version": str(FILE_VERSION),
            "tensors": json.dumps(manifest, separators=(",", ":")),
        }
        save_tensors(path, tensors, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> TaskVector:
        """Load a file written by :meth:`save`; raises ValueError if it is not a task vector file."""
        try:
            stored, metadata = load_tensors_with_metadata(path, device="cpu")
        except safetensors.SafetensorError as e:
            raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file: {e}") from e
        if metadata.get("format") != FILE_FORMAT:
            found = metadata.get("format")
            raise ValueError(f"{os.fspath(path)!r} is not a task vector file (format={found!r})")
        try:
            version = int(metadata["version"])
            manifest = json.loads(metadata["tensors"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{os.fspath(path)!r}: corrupt task vector metadata ({e})") from e
        if version != FILE_VERSION:
            raise ValueError(f"{os.fspath(path)!r}: unsupported task vector file version {version}")

        out: dict[str, torch.Tensor] = {}
        try:
            for entry in manifest:
                name, fmt = entry["name"], entry["format"]
                shape = tuple(int(s) for s in entry["shape"])
                dtype = _dtype_from_name(entry["dtype"])
                if fmt == "dense":
                    t = stored[f"dense::{name}"]
                elif fmt == "sparse":
                    values, packed = stored[f"values::{name}"], stored[f"mask::{name}"]
                    n = math.prod(shape)
                    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
                        raise ValueError(f"sparse entry {name!r} has a malformed mask")
                    occupied = torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
                    if values.dtype != dtype or int(occupied.sum()) != values.numel():
                        raise ValueError(f"sparse entry {name!r} is inconsistent")
                    # Scatter raw bits into a zero (all bits clear) buffer, then reinterpret.
                    flat_bits = torch.zeros(n, dtype=_bits_view(values).dtype)
                    flat_bits[occupied] = _bits_view(values)
                    t = flat_bits.view(dtype)
                else:
                    raise ValueError(f"unknown storage format {fmt!r} for {name!r}")
                if t.dtype != dtype:
                    raise ValueError(f"{name!r}: stored dtype {t.dtype} != manifest dtype {dtype}")
                out[name] = t.reshape(shape).to(device)
        except KeyError as e:
            raise ValueError(f"{os.fspath(path)!r}: corrupt task vector file, missing {e}") from e
        return cls(out)
