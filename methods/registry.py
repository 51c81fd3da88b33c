"""A small name -> factory registry with one way in and did-you-mean errors.

Models, datasets and methods each have one (it lives here, the lowest layer, so that the
harness builds on it and methods import nothing from the harness). Methods may also come
from any installed distribution through the ``qbench.methods`` entry-point group (see
:mod:`qbench.methods.base`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import QbenchError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {{kind}} {name!r}{hint}; known: {', '.join(sorted(choices))}"


class Registry(Generic[T]):
    """Maps names to objects (factories, classes). ``kind`` is used in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str, where: str | None = None) -> T:
        self._load()
        if name not in self._items:
            raise QbenchError(did_you_mean(name, list(self._items)).format(kind=self.kind), where)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._items.items()))

    def _load(self) -> None:
        """Hook for registries that import their members lazily."""
