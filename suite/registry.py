"""Name → component registries (attacks, defenses). One module per method registers itself by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from suite.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package  # imported on first lookup, so every module in it has registered
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(f"{self.kind} names are lowercase snake_case, not {name!r}")

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._items[name] = item
            return item

        return add

    def register_named(self, name: str) -> Callable[[T], T]:
        """Class decorator: register the class under ``name`` and set its ``name`` attribute to it."""
        add = self.register(name)

        def named(cls: T) -> T:
            cls.name = name
            return add(cls)

        return named

    def _load(self) -> None:
        __import__(self.package)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._items))
