"""The interface every defense implements, and the registry defenses are found in by name.

A defense wraps, it does not replace (as Opacus' ``make_private`` does): it may wrap the transport (the
channel: encryption), and/or install itself on a built session (hooks on what leaves the client head, extra
loss terms, detectors). The training loop stays the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from suite.errors import ConfigError
from suite.registry import Registry
from suite.transport import Transport


@dataclass(frozen=True)
class DefenseConfig:
    """Base of every defense's config. Subclasses add fields with defaults."""


class Defense:
    name: ClassVar[str] = ""
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig

    def __init__(self, config: DefenseConfig | None = None):
        self.config = config if config is not None else self.Config()

    def wrap_transport(self, transport: Transport) -> Transport:
        """The channel the parties will talk over (default: unchanged)."""
        return transport

    def install(self, session) -> None:
        """Attach hooks to a built ``suite.training.Session`` (default: nothing)."""

    def report(self) -> dict[str, Any]:
        """What the defense measured or guarantees (e.g. DP epsilon), recorded with each cell."""
        return {}


DEFENSES: Registry[type[Defense]] = Registry("defense", "defenses")


def register_defense(name: str):
    def add(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        return DEFENSES.register(name)(cls)

    return add


def make_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    cls = DEFENSES.get(name)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(params or {}) - known
    if unknown:
        raise ConfigError(f"defense {name!r} has no parameter {sorted(unknown)[0]!r}; it takes {sorted(known)}")
    try:
        return cls(cls.Config(**(params or {})))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"defense {name!r}: {err}") from None
