"""The threat presets as data: what each adversary may observe or do (``THREATS``), and what a threat needs
of the run (a colluder needs a victim besides itself). No torch: the report and the pre-flight checks read
these without loading the engine; ``suite.interfaces.threats`` adds the observations an attack is handed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

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
    # Inference (issue 25): what the server's memory holds while it generates, besides what it received
    KV_CACHE = "kv_cache"  # the keys and values its blocks cache for every position of a generation
    TRUNK_OUTPUTS = "trunk_outputs"  # the hidden states its trunk returns to the client tail


@dataclass(frozen=True)
class ThreatModel:
    name: str
    description: str
    grants: frozenset[Capability]
    colluder: int | None = None  # the client id that colludes (its traffic is not a victim's)

    def missing(self, required: frozenset[Capability]) -> frozenset[Capability]:
        return frozenset(required) - self.grants


C = Capability
_SERVER = frozenset({C.ACTIVATIONS, C.GRADIENTS, C.BASE_WEIGHTS, C.SHADOW_DATA, C.KV_CACHE, C.TRUNK_OUTPUTS})

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
        ThreatModel(
            "memory_dump",
            "someone who reads the server's memory but not the wire (a memory dump, a shared KV-cache service): "
            "the keys and values cached while it generates, and public knowledge (base weights, public text)",
            frozenset({C.KV_CACHE, C.BASE_WEIGHTS, C.SHADOW_DATA}),
        ),
    )
}


def get_threat(name: str) -> ThreatModel:
    if name not in THREATS:
        raise ConfigError(f"unknown threat {name!r}; presets are: {', '.join(THREATS)}")
    return THREATS[name]


MIN_CLIENTS_WITH_COLLUDER = 2


def colluder_problem(threat: ThreatModel, clients: int) -> str | None:
    """Why ``threat`` cannot run with ``clients`` clients, or None. A threat that names a colluder or peer
    (client ``threat.colluder``) needs a victim other than that client: with one client the colluder *is*
    the victim and the attacker would be handed the victim's own records and weights."""
    if threat.colluder is not None and clients < MIN_CLIENTS_WITH_COLLUDER:
        return (f"threat {threat.name} makes client {threat.colluder} the colluder and needs at least "
                f"{MIN_CLIENTS_WITH_COLLUDER} clients (training.clients = {clients}); use --clients 2 or more")
    return None


def check_threat(threat: ThreatModel, clients: int) -> None:
    problem = colluder_problem(threat, clients)
    if problem:
        raise ConfigError(problem)
