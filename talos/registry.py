"""A tiny name -> object registry used for every pluggable axis (modes, merges, datasets, models), and the
loader of plugins: modules outside the library that register entries when imported."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; an unknown name raises ``ValueError`` listing the valid ones.

    >>> merges = Registry("merge method")
    >>> @merges.register("sum")
    ... def merge_sum(vectors): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; registering a name twice is an error."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove and return the object registered as ``name`` (tests registering a temporary method)."""
        self.get(name)  # unknown names raise with the valid list
        return self._items.pop(name)

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise ``ValueError`` naming the valid choices."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


#: Environment variable naming plugin modules (comma-separated) for processes started without ``--plugins``.
PLUGINS_ENV = "TALOS_PLUGINS"


def plugin_names(value: str | Iterable[str] | None) -> list[str]:
    """Module names from a comma-separated string or an iterable of names (blanks dropped, order kept)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return list(dict.fromkeys(n.strip() for n in items if n and n.strip()))


def load_plugins(names: str | Iterable[str] | None) -> list[ModuleType]:
    """Import each plugin module; a plugin registers its datasets (modes, merges, ...) when imported.

    Plugins keep test and demo data out of the library: ``vision.datasets`` knows the paper's datasets only,
    and ``--plugins vision.synthetic`` (or ``TALOS_PLUGINS=vision.synthetic``) adds the generated smoke
    tasks. Importing a module twice is a no-op, so loading is idempotent. A name that is not an importable
    module raises ``ValueError`` naming it; errors raised inside an existing plugin propagate unchanged.
    """
    modules = []
    for name in plugin_names(names):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            # Only the plugin itself (or a parent package) missing is "unknown"; a missing dependency of a
            # plugin that exists is that plugin's own error and keeps its traceback.
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise
            raise ValueError(f"unknown plugin {name!r}: no module named {e.name!r} (a plugin is an importable "
                             "module that registers datasets when imported, e.g. vision.synthetic, "
                             "vision.demo.tasks, nlp.synthetic)") from None
    return modules
