"""Threat models as data: what each adversary may observe or do, checked before anything runs.

A threat model grants a set of capabilities. An attack declares the capabilities it requires; a cell whose
attack requires more than its threat grants is refused at construction, and the ``Observations`` handed to
an attack are filtered to what the threat grants (a field not granted is ``None``), so an attack cannot use
what it did not declare. Ground truth never enters ``Observations``.

Public knowledge (the base model's weights, its tokenizer, the split point, public text from a similar
domain) is granted explicitly too, so a threat that really lacks it can be modelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum

import torch

from suite.engine.split import SplitSpec
from suite.engine.transport import Frame
from suite.errors import ConfigError


class Capability(StrEnum):
    WIRE = "wire"  # the bytes of every frame between the victims and the server, as sent
    ACTIVATIONS = "activations"  # plaintext client-head outputs (+ padding mask) arriving at the server
    GRADIENTS = "gradients"  # plaintext gradients sent by client tails to the server
    BASE_WEIGHTS = "base_weights"  # the public pretrained weights
    SHADOW_DATA = "shadow_data"  # public text from a similar domain (never the victims' records)
    COLLUDER_WEIGHTS = "colluder_weights"  # a colluding client's fine-tuned head and tail
    COLLUDER_DATA = "colluder_data"  # a colluding client's own private records
    CONTROL_SERVER = "control_server"  # may deviate from the protocol: chooses what the server sends back


@dataclass(frozen=True)
class ThreatModel:
    name: str
    description: str
    grants: frozenset[Capability]
    colluder: int | None = None  # the client id that colludes (its traffic is not a victim's)

    def missing(self, required: frozenset[Capability]) -> frozenset[Capability]:
        return frozenset(required) - self.grants


C = Capability
_SERVER = frozenset({C.ACTIVATIONS, C.GRADIENTS, C.BASE_WEIGHTS, C.SHADOW_DATA})

THREATS: dict[str, ThreatModel] = {
    t.name: t
    for t in (
        ThreatModel(
            "curious_server",
            "honest-but-curious server: follows the protocol, keeps every decrypted activation and gradient, "
            "knows the public base weights and has public shadow text",
            _SERVER,
        ),
        ThreatModel(
            "malicious_server",
            "malicious server: like the curious server, and may return chosen gradients to the client head "
            "and chosen hidden states to the client tail during training",
            _SERVER | {C.CONTROL_SERVER},
        ),
        ThreatModel(
            "colluding_client",
            "the curious server plus one client (client 0) that hands over its fine-tuned head/tail weights "
            "and its own private records; the victims are the other clients",
            _SERVER | {C.COLLUDER_WEIGHTS, C.COLLUDER_DATA},
            colluder=0,
        ),
        ThreatModel(
            "eavesdropper",
            "someone on the wire between the clients and the server: sees the bytes sent, and public "
            "knowledge (base weights, public text); with encryption on, ciphertext only",
            frozenset({C.WIRE, C.BASE_WEIGHTS, C.SHADOW_DATA}),
        ),
        ThreatModel(
            "peer_client",
            "another client of the same server (client 0) on the same network: sees its peers' frames on the "
            "wire and has its own records as public-domain text; the victims are the other clients",
            frozenset({C.WIRE, C.BASE_WEIGHTS, C.SHADOW_DATA}),
            colluder=0,
        ),
    )
}


def get_threat(name: str) -> ThreatModel:
    if name not in THREATS:
        raise ConfigError(f"unknown threat {name!r}; presets are: {', '.join(THREATS)}")
    return THREATS[name]


@dataclass(frozen=True)
class ObservedBatch:
    """One victim batch as the server saw it: what the head sent and what the tail sent back."""

    client_id: int
    step: int
    hidden: torch.Tensor  # [B, T, H] client-head output
    attention_mask: torch.Tensor  # [B, T], 1 = real token (the padding pattern crosses the wire)
    gradient: torch.Tensor | None = None  # [B, T, H] gradient the tail sent for the trunk's output

    def __post_init__(self) -> None:
        # Attacks do their math in float32 on the host, whatever device and dtype the parties computed in
        # (bf16 observations would lose precision in every inversion); a no-op for fp32 CPU tensors.
        for name in ("hidden", "gradient"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and (t.dtype != torch.float32 or t.is_cuda):
                object.__setattr__(self, name, t.detach().to("cpu", torch.float32))
        if isinstance(self.attention_mask, torch.Tensor) and self.attention_mask.device.type != "cpu":
            object.__setattr__(self, "attention_mask", self.attention_mask.cpu())


@dataclass(frozen=True)
class Observations:
    """Everything an attack may use, filtered by its threat model. Fields not granted are ``None``."""

    threat: ThreatModel
    spec: SplitSpec  # the split point is part of the protocol: every party knows it
    tokenizer: object  # public
    max_length: int
    batches: tuple[ObservedBatch, ...] | None = None  # ACTIVATIONS (gradient field only with GRADIENTS)
    frames: tuple[Frame, ...] | None = None  # WIRE
    base_model: Callable[[], torch.nn.Module] | None = None  # BASE_WEIGHTS: returns a fresh copy
    shadow: tuple[str, ...] | None = None  # SHADOW_DATA
    colluder_head_tail: Callable[[], tuple[torch.nn.Module, torch.nn.Module]] | None = None  # COLLUDER_WEIGHTS
    colluder_records: tuple[str, ...] | None = None  # COLLUDER_DATA
    # Always public (Kerckhoffs): the deployed defense as a fresh instance built from its public parameters
    # (``suite.interfaces.defense.public_defense``: no secret randomness, never installed), so a knowing attacker can
    # simulate it with ``simulate_head`` / ``simulate_release``; None when the runner has none to give.
    defense: object | None = None
    # Public: the victims' sequence lengths, one per reconstructed row in the order of the reconstruction
    # (the padding pattern crosses the wire in clear; where a defense hides lengths, every row is
    # ``max_length``). What the blind baseline knows of the victims besides public text.
    lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        need = {
            "batches": C.ACTIVATIONS,
            "frames": C.WIRE,
            "base_model": C.BASE_WEIGHTS,
            "shadow": C.SHADOW_DATA,
            "colluder_head_tail": C.COLLUDER_WEIGHTS,
            "colluder_records": C.COLLUDER_DATA,
        }
        for f in fields(self):
            cap = need.get(f.name)
            if cap is not None and getattr(self, f.name) is not None and cap not in self.threat.grants:
                raise ConfigError(f"threat {self.threat.name!r} does not grant {cap.value}: {f.name} must be None")
        if self.batches and C.GRADIENTS not in self.threat.grants and any(b.gradient is not None for b in self.batches):
            raise ConfigError(f"threat {self.threat.name!r} does not grant gradients")


def filter_observations(threat: ThreatModel, capabilities: frozenset[Capability] | None = None,
                        **available) -> Observations:
    """Build ``Observations`` from everything the runner captured, keeping only what ``threat`` grants and,
    when ``capabilities`` is given (an attack's ``requires | uses``), only what the attack declares. Public
    fields (spec, tokenizer, max_length, defense, lengths) always come."""
    g = threat.grants if capabilities is None else threat.grants & frozenset(capabilities)
    batches = available.get("batches")
    if batches is not None and C.GRADIENTS not in g:
        batches = tuple(ObservedBatch(b.client_id, b.step, b.hidden, b.attention_mask) for b in batches)
    return Observations(
        threat=threat,
        spec=available["spec"],
        tokenizer=available["tokenizer"],
        max_length=available["max_length"],
        batches=batches if C.ACTIVATIONS in g else None,
        frames=available.get("frames") if C.WIRE in g else None,
        base_model=available.get("base_model") if C.BASE_WEIGHTS in g else None,
        shadow=available.get("shadow") if C.SHADOW_DATA in g else None,
        colluder_head_tail=available.get("colluder_head_tail") if C.COLLUDER_WEIGHTS in g else None,
        colluder_records=available.get("colluder_records") if C.COLLUDER_DATA in g else None,
        defense=available.get("defense"),
        lengths=available.get("lengths"),
    )
