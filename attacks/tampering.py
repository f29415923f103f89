"""Integrity attack: a malicious server tampers with what it sends back (Lu et al. 2023, "Exploring the
Robustness of Decentralized Training for LLMs", case study of a malicious pipeline stage).

At a chosen ``rate`` of steps (seeded), the server corrupts the hidden states it returns to the client tail
and/or the gradient it returns to the client head:

* ``sign_flip`` — negate the tensor;
* ``random`` — replace it with Gaussian values of the same mean and std;
* ``scaled_noise`` — add Gaussian noise with std ``scale`` × the tensor's std (subtle).

It recovers no text: its effect is on utility, and what matters is whether the integrity defenses catch it.
The steps it tampered with are kept (``tampered``) as ground truth for detection metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from suite.attack import Attack, AttackConfig, Reconstruction, ServerPolicy, register_attack
from suite.threats import Capability, Observations


@dataclass(frozen=True)
class TamperingConfig(AttackConfig):
    target: str = "hidden"  # hidden | gradient | both
    mode: str = "sign_flip"  # sign_flip | random | scaled_noise
    rate: float = 0.2  # fraction of steps tampered with
    scale: float = 0.1  # for scaled_noise: noise std relative to the tensor's std

    def __post_init__(self) -> None:
        if self.target not in ("hidden", "gradient", "both"):
            raise ValueError(f"target must be hidden, gradient or both, not {self.target!r}")
        if self.mode not in ("sign_flip", "random", "scaled_noise"):
            raise ValueError(f"mode must be sign_flip, random or scaled_noise, not {self.mode!r}")
        if not 0 <= self.rate <= 1 or self.scale < 0:
            raise ValueError("rate must be in [0, 1] and scale >= 0")


def corrupt(x: torch.Tensor, mode: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    if mode == "sign_flip":
        return -x
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    if mode == "random":
        return noise * x.std() + x.mean()
    return x + noise * scale * x.std()


class TamperPolicy(ServerPolicy):
    def __init__(self, config: TamperingConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.tampered: list[tuple[int, str]] = []  # (step, "hidden" | "gradient")
        self.seen: list[tuple[int, str]] = []

    def _maybe(self, step: int, what: str, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((step, what))
        if self.config.target in (what, "both") and self.rng.random() < self.config.rate:
            self.tampered.append((step, what))
            return corrupt(x, self.config.mode, self.config.scale, self.generator)
        return x

    def on_forward(self, client_ids, step, hidden_in, attention_mask, honest_out):
        return self._maybe(step, "hidden", honest_out)

    def head_gradient(self, client_ids, step, hidden_in, attention_mask, honest_grad):
        return self._maybe(step, "gradient", honest_grad)


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
        self.policy = TamperPolicy(self.config)
        return self.policy

    def reconstruct(self, obs: Observations) -> Reconstruction:
        n = len(self.policy.tampered) if self.policy else 0
        seen = len(self.policy.seen) if self.policy else 0
        note = f"integrity attack ({self.config.mode} on {self.config.target}): tampered {n} of {seen} replies"
        return Reconstruction(torch.empty(0, 0, dtype=torch.long), (), note=note,
                              extra={"tampered": list(self.policy.tampered) if self.policy else []})
