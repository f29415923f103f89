"""The eavesdropper's attack: parse the captured bytes as the splitleak wire format, then invert.

Without encryption (FL-GLM's public code talks over an insecure channel) every client→server frame parses
into an ``ActivationMsg`` and the eavesdropper holds exactly what a curious server holds of the activations;
it then runs an inner passive attack on them (by default the closed-form learned inverter, fit on public
shadow text; ``inner``/``inner_params`` choose another). With authenticated encryption no frame parses: the
attack reports that and returns nothing, so leakage is measured (near zero), not assumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from suite.attack import ATTACKS, Attack, AttackConfig, Reconstruction, register_attack
from suite.errors import ProtocolError
from suite.protocol import TO_SERVER, ActivationMsg, decode
from suite.threats import Capability, Observations, ObservedBatch, ThreatModel
from suite.transport import SERVER

# Parameters an inner attack gets unless ``inner_params`` says otherwise: the learned inverter runs in its
# closed-form mode, the strongest cheap attack an eavesdropper with public weights and text can mount.
_INNER_DEFAULTS: dict[str, dict] = {"learned_inversion": {"mode": "linear"}}


@dataclass(frozen=True)
class WireInversionConfig(AttackConfig):
    # The passive attack run on the parsed activations and its parameters (over ``_INNER_DEFAULTS``).
    # Nearest-embedding alone reads nothing back beyond k = 0 and would understate the leak.
    inner: str = "learned_inversion"
    inner_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inner == "wire_inversion":
            raise ValueError("inner must be another attack")
        if not isinstance(self.inner_params, dict):
            raise ValueError("inner_params must be a table of the inner attack's parameters")
        if self.inner not in ATTACKS.names():
            raise ValueError(f"unknown inner attack {self.inner!r}; choose one of {', '.join(ATTACKS.names())}")
        try:
            self.inner_config()
        except TypeError as err:
            raise ValueError(f"inner_params for {self.inner!r}: {err}") from None

    def inner_config(self) -> AttackConfig:
        params = {**_INNER_DEFAULTS.get(self.inner, {}), **self.inner_params}
        return ATTACKS.get(self.inner).Config(**{"seed": self.seed, **params})


@register_attack("wire_inversion")
class WireInversionAttack(Attack):
    requires = frozenset({Capability.WIRE, Capability.BASE_WEIGHTS})
    # Whatever its inner attacks use when granted (public text, a colluding peer's weights and records).
    uses = frozenset({Capability.SHADOW_DATA, Capability.COLLUDER_WEIGHTS, Capability.COLLUDER_DATA})
    Config = WireInversionConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        parsed, failed = [], 0
        for frame in obs.frames or ():
            if frame.dst != SERVER:
                continue
            try:
                msg = decode(frame.data)
            except ProtocolError:
                failed += 1
                continue
            if isinstance(msg, ActivationMsg) and msg.direction == TO_SERVER and msg.attention_mask is not None:
                parsed.append(ObservedBatch(msg.client_id, msg.step, msg.hidden, msg.attention_mask))
        if not parsed:
            note = f"nothing to invert: 0 of {failed} client->server frames parse (ciphertext)"
            return Reconstruction(torch.empty(0, 0, dtype=torch.long), (), note=note)
        # What parses off the wire is activations: hand them to the inner attack as such.
        inner_cls = ATTACKS.get(self.config.inner)
        grants = (obs.threat.grants | {Capability.ACTIVATIONS}) - {Capability.WIRE}
        view = ThreatModel(f"{obs.threat.name}+parsed", "activations parsed off a plaintext wire", frozenset(grants))
        missing = view.missing(inner_cls.requires)
        if missing:
            raise ValueError(f"inner attack {self.config.inner!r} needs {sorted(m.value for m in missing)}")
        inner_obs = dataclasses.replace(obs, threat=view, batches=tuple(parsed), frames=None)
        result = inner_cls(self.config.inner_config()).reconstruct(inner_obs)
        note = f"{len(parsed)} plaintext activation frames parsed; {failed} did not parse"
        return dataclasses.replace(result, note=note)
