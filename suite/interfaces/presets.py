"""The threat presets as data: what each adversary may observe or do (``THREATS``), and what a threat needs
of the run (a colluder needs a victim besides itself). No torch: the report and the pre-flight checks read
these without loading the engine; ``suite.interfaces.threats`` adds the observations an attack is handed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from suite.errors import ConfigError
from suite.registry import did_you_mean


class Capability(StrEnum):
    WIRE = "wire"  # the bytes of every frame between the victims and the server, as sent
    ACTIVATIONS = "activations"  # plaintext client-head outputs (+ padding mask) arriving at the server
    GRADIENTS = "gradients"  # plaintext gradients sent by client tails to the server
    BASE_WEIGHTS = "base_weights"  # the public pretrained weights
    SHADOW_DATA = "shadow_data"  # public text from a similar domain (never the victims' records)
    COLLUDER_WEIGHTS = "colluder_weights"  # a colluding client's fine-tuned head and tail
    COLLUDER_DATA = "colluder_data"  # a colluding client's own private records
    CONTROL_SERVER = "control_server"  # may deviate from the protocol: chooses what the server sends back
    # Memorisation: trained weights after training, the canary victim's where there is a choice
    SERVER_ADAPTERS = "server_adapters"  # the server's trunk adapters (with the public base head and tail)
    COLLUDER_MODEL = "colluder_model"  # a colluding client's own head and tail with the server's trunk (its adapter set)
    RELEASED_MODEL = "released_model"  # a victim's head and tail with the server's trunk, as if published
    # Inference: what the server's memory holds while it generates, besides what it received
    KV_CACHE = "kv_cache"  # the keys and values its blocks cache for every position of a generation
    TRUNK_OUTPUTS = "trunk_outputs"  # the hidden states its trunk returns to the client tail


@dataclass(frozen=True)
class ThreatModel:
    name: str
    description: str
    grants: frozenset[Capability]
    colluder: int | None = None  # the client id that colludes (its traffic is not a victim's)
    # Pipeline stages ([training] stages = S, suite.engine.stages): a stage threat observes (and, with
    # CONTROL_SERVER, controls) only the stages it names; ``stage_params`` is how many indices its name takes
    # (``curious_stage:1``, ``colluding_stages:0,2``); 0 for every other threat.
    stages: tuple[int, ...] = ()
    stage_params: int = 0

    def missing(self, required: frozenset[Capability]) -> frozenset[Capability]:
        return frozenset(required) - self.grants


C = Capability
_SERVER = frozenset({C.ACTIVATIONS, C.GRADIENTS, C.BASE_WEIGHTS, C.SHADOW_DATA, C.SERVER_ADAPTERS, C.KV_CACHE,
                     C.TRUNK_OUTPUTS})
# A pipeline stage holds its own stage's adapters and cache only, never the whole trunk's (no memorisation or
# inference view of a stage yet).
_STAGE = _SERVER - {C.SERVER_ADAPTERS, C.KV_CACHE, C.TRUNK_OUTPUTS}

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
            _SERVER | {C.COLLUDER_WEIGHTS, C.COLLUDER_DATA, C.COLLUDER_MODEL},
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
            "curious_stage",
            "one honest-but-curious pipeline stage (its index a parameter: curious_stage:1): keeps the hidden "
            "states entering its first block and the gradients the next stage sends back, knows the public "
            "base weights and has public shadow text; the adapters above and below it are other parties'",
            _STAGE,
            stage_params=1,
        ),
        ThreatModel(
            "malicious_stage",
            "one malicious pipeline stage (malicious_stage:1): like the curious stage, and may send chosen "
            "hidden states to the next stage and chosen gradients to the previous one during training",
            _STAGE | {C.CONTROL_SERVER},
            stage_params=1,
        ),
        ThreatModel(
            "colluding_stages",
            "two curious pipeline stages that pool their views (colluding_stages:0,2): the hidden states entering "
            "the earlier one and the gradients the later one receives, as one server spanning both would see",
            _STAGE,
            stage_params=2,
        ),
        ThreatModel(
            "adapter_thief",
            "someone who steals the server's trunk adapters after training, without the traffic: the adapters "
            "(the canary victim's set under per_client), the public base weights and public text",
            frozenset({C.SERVER_ADAPTERS, C.BASE_WEIGHTS, C.SHADOW_DATA}),
        ),
        ThreatModel(
            "model_user",
            "a user of the released fine-tuned model (a victim's head and tail with the server's trunk), "
            "with the public base weights and public text",
            frozenset({C.RELEASED_MODEL, C.BASE_WEIGHTS, C.SHADOW_DATA}),
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
    """A preset by name; a stage threat takes its stage indices after a colon (``curious_stage:1``,
    ``colluding_stages:0,2``)."""
    base, _, args = name.partition(":")
    if base not in THREATS:
        raise ConfigError(f"unknown threat {name!r}{did_you_mean(base, THREATS)} (presets: {', '.join(THREATS)})")
    preset = THREATS[base]
    if not preset.stage_params:
        if args:
            raise ConfigError(f"threat {base!r} takes no stage index; write {base!r}")
        return preset
    example = ",".join(str(i) for i in range(preset.stage_params))
    try:
        stages = tuple(int(a) for a in args.split(",")) if args else ()
    except ValueError:
        stages = ()
    if len(stages) != preset.stage_params or len(set(stages)) != len(stages) or min(stages, default=0) < 0:
        raise ConfigError(f"threat {name!r} needs {preset.stage_params} distinct stage index(es) >= 0: write "
                          f"'{base}:{example}' or {{ name = \"{base}\", stage = {example or 0} }}")
    stages = tuple(sorted(stages))
    return replace(preset, name=stage_threat_name(base, stages), stages=stages)


def stage_threat_name(base: str, stages: tuple[int, ...] | list[int] | int) -> str:
    """The canonical name of a stage threat: ``curious_stage:1``, ``colluding_stages:0,2``."""
    stages = (stages,) if isinstance(stages, int) else tuple(stages)
    return f"{base}:{','.join(str(i) for i in sorted(stages))}"


def stage_problem(threat: ThreatModel, stages: int) -> str | None:
    """Why ``threat`` cannot run with ``[training] stages`` = ``stages``, or None: a stage index out of range,
    or a whole-server policy (``malicious_server``) over several stages."""
    if threat.stages and max(threat.stages) >= stages:
        return (f"threat {threat.name} names stage {max(threat.stages)}, but training.stages = {stages} has stages "
                f"0..{stages - 1}; raise training.stages or lower the index")
    if stages > 1 and not threat.stages and C.CONTROL_SERVER in threat.grants:
        return (f"threat {threat.name} controls the whole server, which training.stages = {stages} splits into "
                "stage parties; use malicious_stage:<index>")
    return None


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
