"""The interface every attack implements, and the registry attacks are found in by name.

An attack is one module in ``attacks/``: a frozen ``…Config`` dataclass and a class registered under a
lowercase name that declares the capabilities it requires. Passive attacks only ``reconstruct`` from
``Observations``; active attacks also return a ``ServerPolicy`` that replaces the honest server's replies
during training (FSHA, tampering). Attacks never receive the parties, the model objects or ground truth.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from suite.errors import ConfigError
from suite.interfaces.threats import Capability, Observations, ThreatModel
from suite.registry import Registry


@dataclass(frozen=True)
class AttackConfig:
    """Base of every attack's config. Subclasses add fields with defaults."""

    seed: int = 0


@dataclass(frozen=True)
class Reconstruction:
    """One reconstructed token sequence per observed sequence, in the order of ``Observations.batches``
    (rows of batch 0, then batch 1, …). ``token_ids`` is [N, T]; padding positions are ignored by metrics.
    ``note`` says why an attack could not work (e.g. ciphertext on the wire)."""

    token_ids: torch.Tensor
    texts: tuple[str, ...]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # attack-specific diagnostics (e.g. FSHA utility damage)


class ServerPolicy:
    """What a server that deviates from the protocol sends back. The defaults are the honest behaviour.

    ``on_forward`` sees the head output that arrived (``hidden_in``, [B, T, H]) and the honest trunk output,
    and returns the hidden states sent to the client tail. ``head_gradient`` sees the head output and the
    honest gradient for it, and returns the gradient sent to the client head.
    """

    def on_forward(self, client_ids: list[int], step: int, hidden_in: torch.Tensor, attention_mask: torch.Tensor,
                   honest_out: torch.Tensor) -> torch.Tensor:
        return honest_out

    def head_gradient(self, client_ids: list[int], step: int, hidden_in: torch.Tensor, attention_mask: torch.Tensor,
                      honest_grad: torch.Tensor) -> torch.Tensor:
        return honest_grad

    def on_update(self, client_ids: list[int], step: int, trunk: torch.nn.Module) -> None:
        """After the server's (or stage's) optimiser step: a party that trains its weights toward its own goal
        changes them here, and then computes honestly with them. Honest: nothing."""


class Attack:
    """Base class. Subclasses set ``name`` (by registering), ``requires`` and ``Config``."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[Capability]] = frozenset()
    # Optional capabilities the attack uses when its threat grants them (e.g. a colluder's weights). The
    # runner hands an attack only ``(requires | uses) & threat.grants``; public fields always come.
    uses: ClassVar[frozenset[Capability]] = frozenset()
    Config: ClassVar[type[AttackConfig]] = AttackConfig
    active: ClassVar[bool] = False  # True when the attack needs a ServerPolicy during training
    # "inversion": recovers the client's text (scored by leakage metrics); "integrity": corrupts training
    # (scored by what the integrity defenses detect and by utility).
    kind: ClassVar[str] = "inversion"
    # "memorisation" attacks read a trained model and need at least one of these views granted
    # (``missing_for``), and are handed only the parts of the ``Audit`` they name here.
    requires_any: ClassVar[frozenset[Capability]] = frozenset()
    audits: ClassVar[frozenset[str]] = frozenset()
    # The modes (``[matrix] mode``) whose traffic the attack reads: an attack of the server's inference memory
    # (KV cache, trunk outputs) has nothing to read in training; one that needs gradients nothing in inference.
    modes: ClassVar[frozenset[str]] = frozenset({"training", "inference"})

    def __init__(self, config: AttackConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def capabilities(cls) -> frozenset[Capability]:
        """Everything this attack may be handed: what it requires plus what it uses when granted."""
        return frozenset(cls.requires) | frozenset(cls.uses) | frozenset(cls.requires_any)

    @classmethod
    def missing_for(cls, threat: ThreatModel) -> frozenset[Capability]:
        """What ``threat`` lacks for this attack: its ``requires``, and all of ``requires_any`` when the threat
        grants none of them."""
        missing = threat.missing(cls.requires)
        if cls.requires_any and not cls.requires_any & threat.grants:
            missing |= cls.requires_any
        return missing

    @classmethod
    def threat_problem(cls, threat: ThreatModel) -> str | None:
        """Why this attack has no meaning under ``threat`` although it grants every capability (e.g. the stage
        it names cannot do what the attack does), or None. Default: None."""
        return None

    def server_policy(self, obs: Observations) -> ServerPolicy | None:
        """Active attacks: the policy the server follows during training (``obs`` holds no victim traffic
        yet, only public knowledge). Passive attacks return None."""
        return None

    def reconstruct(self, obs: Observations) -> Reconstruction:
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack", "attacks")


def register_attack(name: str):
    """Class decorator: ``@register_attack("nearest_embedding")``."""

    return ATTACKS.register_named(name)


def make_attack(name: str, threat: ThreatModel, params: dict[str, Any] | None = None) -> Attack:
    """Build an attack for a threat model, refusing it when it requires more than the threat grants."""
    cls = ATTACKS.get(name)
    missing = cls.missing_for(threat)
    if missing:
        some = " (one of them)" if missing & cls.requires_any else ""
        raise ConfigError(
            f"attack {name!r} needs {', '.join(sorted(m.value for m in missing))}{some}, which threat "
            f"{threat.name!r} does not grant"
        )
    problem = cls.threat_problem(threat)
    if problem:
        raise ConfigError(problem)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(params or {}) - known
    if unknown:
        raise ConfigError(f"attack {name!r} has no parameter {sorted(unknown)[0]!r}; it takes {sorted(known)}")
    try:
        config = cls.Config(**(params or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"attack {name!r}: {err}") from None
    return cls(config)


@dataclass(frozen=True)
class Cost:
    seconds: float
    peak_rss_mib: float


def timed_reconstruct(attack: Attack, obs: Observations) -> tuple[Reconstruction, Cost]:
    """Run ``attack.reconstruct`` and report wall time and the process's peak resident memory."""
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(attack.config.seed)
        result = attack.reconstruct(obs)
    seconds = time.perf_counter() - start
    return result, Cost(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
