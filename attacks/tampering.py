"""Integrity attack: a malicious server tampers with what it sends back (Lu et al. 2023, "Exploring the
Robustness of Decentralized Training for LLMs", case study of a malicious pipeline stage).

At a chosen ``rate`` of steps (seeded), the server corrupts the hidden states it returns to the client tail
and/or the gradient it returns to the client head:

* ``sign_flip`` — negate the tensor;
* ``random`` — replace it with Gaussian values of the same mean and std;
* ``scaled_noise`` — add Gaussian noise with std ``scale`` × the tensor's std (subtle);
* ``targeted`` — push every position along one fixed direction (a seeded unit vector of the hidden size,
  the same at every step): add ``scale`` × the tensor's std × √H × that direction, a shift of about
  ``scale`` × a typical position's norm that, unlike noise, does not average out over steps.

Run on a pipeline stage (threat ``malicious_stage:i``) the policy tampers with what that stage sends on to
the next stage and back to the previous one (the seed paper's malicious stage).

It recovers no text: its effect is on utility, and what matters is whether the integrity defenses catch it.
The steps it tampered with are kept (``tampered``) as ground truth for detection metrics.

``adaptive = true`` is a server that read the deployed audit's code and public parameters (Kerckhoffs:
``Observations.defense``) and tampers only where the cheap checks do not look: hidden states only at
positions past the spot-checked prefix (``spot_tokens``), head gradients only at real positions other than
the last (keeping the zero-gradient invariant) and with ``scaled_noise`` (keeping the cosine to the tail
gradient high for small ``scale``). Against an audit whose schedule is drawn from a CSPRNG after the reply,
it cannot know which steps are fully audited; ``rate`` (tamper probability) and ``scale`` (magnitude) are
its strength knobs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, ServerPolicy, register_attack
from suite.interfaces.threats import Capability, Observations


@dataclass(frozen=True)
class TamperingConfig(AttackConfig):
    target: str = "hidden"  # hidden | gradient | both | none (with ``state``: tamper with the weights only)
    mode: str = "sign_flip"  # sign_flip | random | scaled_noise | targeted
    rate: float = 0.2  # fraction of steps tampered with
    scale: float = 0.1  # for scaled_noise: noise std relative to the tensor's std
    adaptive: bool = False  # tamper only where the deployed audit's cheap checks do not look (see above)
    # Train toward its own goal: on a tampered step, after its honest optimiser step, move every trainable
    # weight by ``scale`` x max(its std, 1e-3) along one fixed direction, then compute honestly with it.
    state: bool = False

    def __post_init__(self) -> None:
        if self.target not in ("hidden", "gradient", "both", "none"):
            raise ValueError(f"target must be hidden, gradient, both or none, not {self.target!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 0 <= self.rate <= 1 or self.scale < 0:
            raise ValueError("rate must be in [0, 1] and scale >= 0")


MODES = ("sign_flip", "random", "scaled_noise", "targeted")


def corrupt(x: torch.Tensor, mode: str, scale: float, generator: torch.Generator,
            direction: torch.Tensor | None = None) -> torch.Tensor:
    if mode == "sign_flip":
        return -x
    if mode == "targeted":
        if direction is None:
            raise ValueError("targeted tampering needs its fixed direction")
        return x + scale * x.std() * math.sqrt(x.shape[-1]) * direction.to(x.device, x.dtype)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    if mode == "random":
        return noise * x.std() + x.mean()
    return x + noise * scale * x.std()


class TamperPolicy(ServerPolicy):
    def __init__(self, config: TamperingConfig, spot_tokens: int = 0):
        self.config = config
        self.spot_tokens = spot_tokens  # adaptive: the audit's public spot-check prefix (0: no audit deployed)
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._direction: torch.Tensor | None = None  # targeted: one unit vector, drawn on first use
        self.tampered: list[tuple[int, str]] = []  # (step, "hidden" | "gradient")
        self.seen: list[tuple[int, str]] = []

    def _where(self, what: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Adaptive: the positions the cheap checks never look at (None: everywhere)."""
        if not self.config.adaptive:
            return None
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        if what == "hidden":
            keep = (positions >= self.spot_tokens) & mask.bool()
        else:  # real positions other than the last: the zero-gradient invariant holds
            keep = positions < (mask.sum(1, keepdim=True) - 1)
        return keep.unsqueeze(-1)

    def _maybe(self, step: int, what: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen.append((step, what))
        if self.config.target in (what, "both") and self.rng.random() < self.config.rate:
            if self.config.mode == "targeted" and self._direction is None:
                d = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(self.config.seed + 1))
                self._direction = d / d.norm()
            bad = corrupt(x, self.config.mode, self.config.scale, self.generator, self._direction)
            where = self._where(what, x, mask)
            if where is not None:
                if not bool(where.any()):
                    return x  # nothing to tamper with unseen (a sequence shorter than the prefix)
                bad = torch.where(where, bad, x)
            self.tampered.append((step, what))
            return bad
        return x

    def on_update(self, client_ids, step, trunk):
        if not self.config.state or self.rng.random() >= self.config.rate:
            return
        g = torch.Generator().manual_seed(self.config.seed + 2)  # the same goal direction every step
        with torch.no_grad():
            for _, p in sorted(trunk.named_parameters(), key=lambda kv: kv[0]):
                if p.requires_grad:
                    direction = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
                    size = max(float(p.float().std()) if p.numel() > 1 else 0.0, 1e-3)
                    p.add_(self.config.scale * size * direction)
        self.tampered.append((step, "state"))

    def on_forward(self, client_ids, step, hidden_in, attention_mask, honest_out):
        return self._maybe(step, "hidden", honest_out, attention_mask)

    def head_gradient(self, client_ids, step, hidden_in, attention_mask, honest_grad):
        return self._maybe(step, "gradient", honest_grad, attention_mask)


@register_attack("tampering")
class TamperingAttack(Attack):
    requires = frozenset({Capability.CONTROL_SERVER})
    Config = TamperingConfig
    active = True
    kind = "integrity"

    def __init__(self, config: TamperingConfig | None = None):
        super().__init__(config)
        self.policy: TamperPolicy | None = None

    def server_policy(self, obs: Observations) -> ServerPolicy:
        spot = 0
        if self.config.adaptive and obs.defense is not None:  # the deployed defense's public parameters
            spot = int(obs.defense.public_params().get("spot_tokens", 0))
        self.policy = TamperPolicy(self.config, spot)
        return self.policy

    def reconstruct(self, obs: Observations) -> Reconstruction:
        n = len(self.policy.tampered) if self.policy else 0
        seen = len(self.policy.seen) if self.policy else 0
        note = f"integrity attack ({self.config.mode} on {self.config.target}): tampered {n} of {seen} replies"
        return Reconstruction(torch.empty(0, 0, dtype=torch.long), (), note=note,
                              extra={"tampered": list(self.policy.tampered) if self.policy else []})
