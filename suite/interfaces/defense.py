"""The interface every defense implements, and the registry defenses are found in by name.

A defense wraps, it does not replace (as Opacus' ``make_private`` does): it may wrap the transport (the
channel: encryption), and/or install itself on a built session (hooks on what leaves the client head, extra
loss terms, detectors). The training loop stays the same.

Kerckhoffs. Every defense also says how an attacker who knows the mechanism and its public parameters (never
its secret randomness) reproduces it on the attacker's own shadow pipeline (docs/attacks.md,
"Defence-aware attackers"):

* ``public_params()``: the config without its ``secret_fields`` (what a protocol document would publish);
* ``simulate_head(head, input_ids, attention_mask, generator)``: for defenses that shape the head while
  training (NoPeek, MID), a copy of the attacker's head trained the same way on the attacker's shadow text;
  the default is the head itself;
* ``simulate_release(head, input_ids, attention_mask, generator)``: what would leave that head under the
  defense for the attacker's own inputs: same mechanism, same public parameters, randomness drawn from the
  attacker's ``generator``. The default is the head's plain output.

The runner hands attacks ``public_defense(defense)``: a fresh, never-installed instance built from the
public parameters, so an attack can simulate the mechanism but never holds the clients' hooks or noise.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from suite.engine.transport import Transport
from suite.errors import ConfigError
from suite.registry import Registry


@dataclass(frozen=True)
class RemoteServer:
    """What a client in ``splitleak client`` holds of a server that runs in another process: the trunk as
    the public knowledge builds it (public base weights, the config's public adapter layout, before any
    training: never the live server's), the public adapter layout ``adapters`` (client id -> its own adapter
    set's name under ``per_client``, empty when adapters are shared), the config's pipeline ``stages`` and
    ``reveal(client_id, step)``, a request over the link for the
    trunk state the server committed to in that step's reply (safetensors bytes; ``ProtocolError`` when
    the server does not reveal it)."""

    public_trunk: torch.nn.Module
    reveal: Callable[[int, int], bytes]
    adapters: dict[int, str] = dataclasses.field(default_factory=dict)  # client id -> its adapter set (per_client)
    stages: int = 1  # the config's pipeline stages (public): each its own party behind the link


@dataclass(frozen=True)
class _ClientsOnly:
    """The session a client-side defense installs on over the network: this process's client, no server."""

    clients: list

    @property
    def server(self):
        raise ConfigError("this defense needs the server's objects, which a networked client does not hold")


@dataclass(frozen=True)
class DefenseConfig:
    """Base of every defense's config. Subclasses add fields with defaults."""


class Defense:
    name: ClassVar[str] = ""
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig
    # Config fields an attacker never learns (randomness, keys). Everything else is public (Kerckhoffs).
    secret_fields: ClassVar[frozenset[str]] = frozenset({"seed"})
    # True when the defense only transforms the bytes on the wire (``wrap_transport``) and installs nothing:
    # training and the server's decrypted view equal the undefended run's, so the matrix trains once and
    # replays the captured frames through this defense's channel (``suite.experiment.cell.rewire``).
    wire_only: ClassVar[bool] = False
    # Networked mode (``splitleak serve`` / ``client``, ``suite.net``): None when each side can install its
    # part there, else the one-line reason it is refused (docs/network.md, "Defences on `serve` and `client`").
    network_refusal: ClassVar[str | None] = None
    # True when ``install`` needs the server-side parties' public builds (``Session.public``), which the
    # harness then keeps when it builds the session (``prepare(keep_public=True)``).
    keeps_public: ClassVar[bool] = False

    def __init__(self, config: DefenseConfig | None = None):
        self.config = config if config is not None else self.Config()

    def wrap_transport(self, transport: Transport) -> Transport:
        """The channel the parties will talk over (default: unchanged)."""
        return transport

    def calibrate(self, head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Set public parameters from public text before ``install``: ``head`` is the public (not yet trained)
        client head, ``input_ids`` / ``attention_mask`` the tokenised shadow text, never private records
        (default: nothing; DP's ``clip_quantile`` sets its clip here)."""

    def install(self, session) -> None:
        """Attach hooks to a built ``suite.engine.training.Session`` (default: nothing)."""

    # -- networked mode: each side installs its own part ----------------------------------------------

    def install_client(self, client, remote: RemoteServer) -> None:
        """The client's part, in ``splitleak client`` (``client``: this process's ``Client``). Default: what
        ``install`` attaches to the clients (noise, bottlenecks, sanitisation, detectors), on this one."""
        self.install(_ClientsOnly([client]))

    def install_server(self, server) -> None:
        """The server's part, in ``splitleak serve`` (``server``: its ``suite.engine.parties.Server``). Default:
        nothing (the mechanism runs on the clients)."""

    def server_bounds(self, bounds, hidden_size: int):
        """The bounds (``suite.engine.protocol.Bounds``) a server holds every message to under this defense
        (default: unchanged). A defense whose honest messages can exceed the public-text bounds (noise)
        widens them here, from its public parameters only."""
        return bounds

    def report(self) -> dict[str, Any]:
        """What the defense measured or guarantees (e.g. DP epsilon), recorded with each cell."""
        return {}

    # -- how a knowing attacker simulates this defense (never with the clients' randomness) -------------

    def public_params(self) -> dict[str, Any]:
        """The parameters a knowing attacker has: the config without ``secret_fields``."""
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k not in self.secret_fields}

    def simulate_head(self, head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      generator: torch.Generator) -> torch.nn.Module:
        """The attacker's head after training under this defense on its shadow batch (``input_ids`` [N, T],
        ``attention_mask`` [N, T]). Defenses that only act on what is sent return ``head`` unchanged;
        training-time defenses (NoPeek, MID) return a fine-tuned copy and never modify ``head``."""
        return head

    def simulate_release(self, head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         generator: torch.Generator) -> torch.Tensor:
        """What leaves ``head`` (a ``suite.engine.split.ClientHead``) under this defense for the attacker's own
        batch: [N, T, H], with the mechanism's randomness drawn from ``generator``. Default: the plain head
        output (the defense does not change what is sent, e.g. encryption as seen after decryption)."""
        from suite.engine.split import position_ids_for

        with torch.no_grad():
            return head(input_ids, attention_mask, position_ids_for(attention_mask))


def unsafe_seeds(defenses: list) -> list[str]:
    """Names of the defense entries (matrix ``defenses`` items) that fix their noise ``seed``."""
    return [d.get("name", "?") for d in defenses if isinstance(d, dict) and d.get("seed") is not None]


DEFENSES: Registry[type[Defense]] = Registry("defense", "defenses")


def register_defense(name: str):
    """Class decorator: ``@register_defense("dp_gaussian")``."""
    return DEFENSES.register_named(name)


def _as_declared(key: str, value: Any, declared: Any) -> Any:
    """``value`` as its field's declared type (``bool``, ``int``, ``float``, optionally ``| None``), so one
    setting has one spelling (``freeze=0`` is ``freeze=false``, ``spot_tokens=2.0`` is ``spot_tokens=2``,
    ``sigma=1`` is ``sigma=1.0``) before it is hashed; anything else is left to the config's own checks."""
    args = set(typing.get_args(declared)) if typing.get_origin(declared) in (typing.Union, types.UnionType) else {declared}
    if value is None and type(None) in args:
        return None
    kinds = args - {type(None)}
    if kinds == {bool}:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{key} is true or false, got {value!r}")
    if kinds == {int}:
        if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    if kinds == {float}:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key} must be a number, got {value!r}")
    return value


def make_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    cls = DEFENSES.get(name)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(params or {}) - known
    if unknown:
        raise ConfigError(f"defense {name!r} has no parameter {sorted(unknown)[0]!r}; it takes {sorted(known)}")
    try:
        hints = typing.get_type_hints(cls.Config)
        params = {k: _as_declared(k, v, hints.get(k, Any)) for k, v in (params or {}).items()}
        return cls(cls.Config(**params))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"defense {name!r}: {err}") from None


def public_defense(defense: Defense) -> Defense:
    """A fresh instance of ``defense`` built from its public parameters only: what an attack is handed."""
    cls = type(defense)
    return cls(cls.Config(**defense.public_params()))
