"""Typed settings: dataclasses whose fields declare their flag, help text and whether they change results.

Every setting of a run is a field of a :class:`Settings` dataclass, declared next to the code that uses it
(a fine-tuning mode's settings in its file, a domain's model/data/training settings in its ``args.py``). The
application layer (:mod:`talos.app.flags`) turns these fields into command-line flags; a run's
``config.json`` is :meth:`Settings.to_dict`, and its hash covers :meth:`Settings.hashed`: the fields that
change results (``hashed=True``) whose value differs from the declared default, so adding a field with a
default leaves every existing run folder valid.

    @dataclass
    class SparseSettings(Settings):
        sparsity: float = setting(0.9, "fraction of eligible entries frozen", low=0.0, high=1.0, open_low=True)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["setting", "derived", "Settings", "SettingSpec", "specs_of", "merge_specs"]

_MISSING = dataclasses.MISSING


def setting(default: Any, help: str = "", *, choices: Sequence[Any] | None = None, hashed: bool = True,
            flag: str | None = None, low: float | None = None, high: float | None = None,
            open_low: bool = False, open_high: bool = False, kind: type | None = None,
            csv: bool | type = False) -> Any:
    """A settings field: ``default``, its ``--help`` text, allowed ``choices`` or range [``low``, ``high``]
    (ends open with ``open_low``/``open_high``), whether it changes results (``hashed``), an explicit
    ``flag`` name (default: ``--field-name``; no dashes: a positional argument), the value type when the default is
    None (``kind``), and ``csv`` for a comma-separated list flag (``csv=float``: of floats)."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "hashed": hashed,
            "flag": flag, "low": low, "high": high, "open_low": open_low, "open_high": open_high, "kind": kind,
            "csv": csv, "derived": False}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def derived(default: Any = None, help: str = "", *, hashed: bool = True) -> Any:
    """A field filled by validation from other settings (no flag): e.g. a checkpoint file's content hash."""
    meta = {"help": help, "choices": None, "hashed": hashed, "flag": None, "low": None, "high": None,
            "open_low": False, "open_high": False, "kind": None, "csv": False, "derived": True}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SettingSpec:
    """One field of a settings class, as the flag builder and the checks read it."""

    name: str
    default: Any
    kind: type | None
    help: str
    choices: tuple | None
    hashed: bool
    flag: str | None
    low: float | None
    high: float | None
    open_low: bool
    open_high: bool
    csv: bool | type
    derived: bool
    owner: str

    def check(self, value: Any) -> None:
        """ValueError when ``value`` is outside the declared choices or range (None passes: "use the preset")."""
        name = self.flag or "--" + self.name.replace("_", "-")
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if too_low or too_high:
            lo = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low}"
            hi = "" if self.high is None else f"{'<' if self.open_high else '<='} {self.high}"
            raise ValueError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}, got {value}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"settings field {f.name} needs a default")


def specs_of(cls: type) -> list[SettingSpec]:
    """The :class:`SettingSpec` of every field of the settings dataclass ``cls``, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "hashed" not in m:
            raise TypeError(f"{cls.__name__}.{f.name} must be declared with talos.config.setting() or derived()")
        d = _default_of(f)
        out.append(SettingSpec(f.name, d, m["kind"] or (type(d) if d is not None else None), m["help"],
                               m["choices"], m["hashed"], m["flag"], m["low"], m["high"], m["open_low"],
                               m["open_high"], m["csv"], m["derived"], cls.__name__))
    return out


def merge_specs(classes: Sequence[type]) -> list[SettingSpec]:
    """The union of the fields of ``classes`` (several modes share e.g. ``sparsity``); a name declared twice
    with a different default, type or choices is an error, so one flag never means two things."""
    seen: dict[str, SettingSpec] = {}
    for cls in classes:
        for s in specs_of(cls):
            prev = seen.get(s.name)
            if prev is None:
                seen[s.name] = s
            elif (prev.default, prev.kind, prev.choices) != (s.default, s.kind, s.choices):
                raise TypeError(f"setting {s.name!r} is declared differently by {prev.owner} and {s.owner}")
    return list(seen.values())


@dataclass
class Settings:
    """Base class of every settings group: a dataclass of :func:`setting` / :func:`derived` fields."""

    def check(self) -> None:
        """ValueError for a value outside its declared choices or range (subclasses add cross-field checks)."""
        for s in specs_of(type(self)):
            s.check(getattr(self, s.name))

    def to_dict(self) -> dict[str, Any]:
        """Every field and its value (the run's ``config.json``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def hashed(self) -> dict[str, Any]:
        """The fields that change results and differ from their declared default (the run hash's entries)."""
        return {s.name: getattr(self, s.name) for s in specs_of(type(self))
                if s.hashed and getattr(self, s.name) != s.default}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "Settings":
        """An instance from a mapping holding (at least) every field's value by name; other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass
class NoSettings(Settings):
    """A mode or merge without settings of its own."""
