"""Threat models as data: what each adversary may observe or do, checked before anything runs.

A threat model grants a set of capabilities. An attack declares the capabilities it requires; a cell whose
attack requires more than its threat grants is refused at construction, and the ``Observations`` handed to
an attack are filtered to what the threat grants (a field not granted is ``None``), so an attack cannot use
what it did not declare. Ground truth never enters ``Observations``.

Public knowledge (the base model's weights, its tokenizer, the split point, public text from a similar
domain) is granted explicitly too, so a threat that really lacks it can be modelled. The presets themselves
(``Capability``, ``ThreatModel``, ``THREATS``, ``get_threat``) live in ``suite.interfaces.presets`` (no torch)
and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from suite.engine.split import SplitSpec
from suite.engine.transport import Frame
from suite.errors import ConfigError
from suite.interfaces.presets import THREATS, C, Capability, ThreatModel, get_threat  # noqa: F401 (re-exported)


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
class Audit:
    """The memorisation question an auditor asks (``[data] canaries``; ``suite.experiment.canaries``). Public:
    the canaries' ``prefix`` and ``secret_format`` (each ``#`` a digit). Handed only to the parts an attack
    declares in ``Attack.audits``: ``canaries`` (the canary texts whose exposure is audited), ``queries``
    (members and non-members shuffled, without labels). Labels and which secret is whose never come."""

    prefix: str
    secret_format: str
    canaries: tuple[str, ...] | None = None
    queries: tuple[str, ...] | None = None


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
    # Memorisation views (trained weights after training; fresh fp32 copies on the host, the canary victim's
    # server adapter set active under per_client). SERVER_ADAPTERS: the server's trunk with its adapters;
    # COLLUDER_MODEL / RELEASED_MODEL: (head, trunk, tail) of the colluder / of the canary victim.
    server_adapters: Callable[[], torch.nn.Module] | None = None
    colluder_model: Callable[[], tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]] | None = None
    released_model: Callable[[], tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]] | None = None
    audit: Audit | None = None  # what a memorisation attack is asked about (only the parts it declares)
    # Inference only, one entry per reconstructed row: the server's KV cache, {global block index:
    # [T, 2 * kv_heads * head_dim] keys then values per position} (KV_CACHE), and the hidden states its trunk
    # returned [T, H] (TRUNK_OUTPUTS).
    kv_cache: tuple[dict[int, torch.Tensor], ...] | None = None
    trunk_outputs: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        need = {
            "batches": C.ACTIVATIONS,
            "frames": C.WIRE,
            "base_model": C.BASE_WEIGHTS,
            "shadow": C.SHADOW_DATA,
            "colluder_head_tail": C.COLLUDER_WEIGHTS,
            "colluder_records": C.COLLUDER_DATA,
            "server_adapters": C.SERVER_ADAPTERS,
            "colluder_model": C.COLLUDER_MODEL,
            "released_model": C.RELEASED_MODEL,
            "kv_cache": C.KV_CACHE,
            "trunk_outputs": C.TRUNK_OUTPUTS,
        }
        for f in fields(self):
            cap = need.get(f.name)
            if cap is not None and getattr(self, f.name) is not None and cap not in self.threat.grants:
                raise ConfigError(f"threat {self.threat.name!r} does not grant {cap.value}: {f.name} must be None")
        if self.batches and C.GRADIENTS not in self.threat.grants and any(b.gradient is not None for b in self.batches):
            raise ConfigError(f"threat {self.threat.name!r} does not grant gradients")


# The model views a memorisation attack may read, in the order view = "auto" tries them: the one definition
# that attacks.toolkit.memorise (opening a view) and suite.experiment.memorisation (running each granted one) share.
MODEL_VIEWS = {"released_model": C.RELEASED_MODEL, "colluder_model": C.COLLUDER_MODEL,
               "server_adapters": C.SERVER_ADAPTERS}


def granted_views(obs: Observations) -> list[str]:
    """The model views ``obs`` holds, in ``MODEL_VIEWS`` order."""
    return [name for name in MODEL_VIEWS if getattr(obs, name) is not None]


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
        server_adapters=available.get("server_adapters") if C.SERVER_ADAPTERS in g else None,
        colluder_model=available.get("colluder_model") if C.COLLUDER_MODEL in g else None,
        released_model=available.get("released_model") if C.RELEASED_MODEL in g else None,
        audit=available.get("audit"),
        kv_cache=available.get("kv_cache") if C.KV_CACHE in g else None,
        trunk_outputs=available.get("trunk_outputs") if C.TRUNK_OUTPUTS in g else None,
    )
