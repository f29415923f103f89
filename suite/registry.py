"""Name → component registries (attacks, defenses). One module per method registers itself by name.

``splitleak list`` prints every registered name with its one-line summary (:func:`summary_of`); a wrong name
anywhere (a config, ``--attack``, ``--defense``, ``--threat``) gets :func:`did_you_mean`'s hint."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable
from typing import Generic, TypeVar

from suite.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, known) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def summary_of(item: object, width: int = 100) -> str:
    """One line about a registered component: its ``summary`` attribute, else the first sentence of its own
    docstring or, without one, of its module's, shortened to ``width`` characters at a word boundary."""
    own_doc = vars(item).get("__doc__") if isinstance(item, type) else getattr(item, "__doc__", None)
    module = sys.modules.get(getattr(item, "__module__", "") or "")
    return one_line(getattr(item, "summary", None) or own_doc or (module.__doc__ if module else None) or "", width)


def one_line(text: str, width: int = 100) -> str:
    """The first sentence of ``text``'s first paragraph on one line, shortened to ``width`` characters."""
    text = " ".join(str(text).strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text, maxsplit=1)[0]
    if len(sentence) > width:
        sentence = sentence[: width - 1].rsplit(" ", 1)[0].rstrip(",;:(") + "…"
    return sentence


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
            raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)} "
                              f"(known: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._items))

    def summaries(self) -> dict[str, str]:
        """Every registered name with its one-line summary (:func:`summary_of`), sorted by name."""
        return {name: summary_of(self._items[name]) for name in self.names()}
