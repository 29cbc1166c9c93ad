"""A tiny name -> object registry used for every pluggable axis (modes, merges, datasets, models)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

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
