"""Name -> implementation registries for targets, runtimes, architectures and devices.

A new target is one module that calls `TARGETS.register("name")`; nothing else in the code
branches on the name. Lookups never return None: an unknown name raises and lists what exists.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import SlmExportError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SlmExportError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
