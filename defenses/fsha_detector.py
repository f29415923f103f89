"""Client-side detection of feature-space hijacking (FSHA; Pasquini et al. 2021), in the spirit of SplitGuard.

An honest server returns, for the client head, the gradient of the client's own task loss: the trunk's
Jacobian applied to the gradient the client tail sent. Because the trunk is a stack of residual blocks, that
gradient keeps a clearly positive cosine to the tail gradient. A hijacking server returns instead the
gradient of its discriminator — a direction that has nothing to do with the client's task — so the cosine
collapses to what two unrelated vectors of n entries give, about ±1/√n. The detector tracks, each step,
z = cos · √n (only the client's own tensors are needed): honest gradients keep z far above chance, hijacked
ones fall to |z| ≈ 1. It raises an alarm when the mean z over the last ``window`` steps falls below
``z_threshold``; from then on it rejects the server's gradients (the head stops moving toward the
attacker's feature space). The threshold is about chance, not about a model: no tuning per architecture.
It also records the task loss, whose stagnation under hijacking is reported alongside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from suite.engine.parties import StepRejected
from suite.interfaces.defense import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class FshaDetectorConfig(DefenseConfig):
    window: int = 3  # steps averaged
    z_threshold: float = 4.0  # mean cos*sqrt(n) below this = indistinguishable from an unrelated direction

    def __post_init__(self) -> None:
        if self.window < 1 or self.z_threshold <= 0:
            raise ValueError("window must be >= 1 and z_threshold > 0")


@register_defense("fsha_detector")
class FshaDetectorDefense(Defense):
    Config = FshaDetectorConfig

    def __init__(self, config: FshaDetectorConfig | None = None):
        super().__init__(config)
        self.scores: dict[int, list[float]] = {}  # per client, z = cos * sqrt(n) per step
        self.detected_at: dict[int, int] = {}  # client id -> step of the alarm
        self.steps_seen = 0

    def _hook(self, client):
        def check(step: int, grad: torch.Tensor, head_out: torch.Tensor, batch) -> torch.Tensor:
            self.steps_seen += 1
            if client.id in self.detected_at:
                raise StepRejected(f"client {client.id} no longer trusts the server (hijacking detected)")
            mask = batch.attention_mask.bool()
            sent = client.sent_gradient
            g, t = grad[mask].flatten(), sent[mask].flatten()
            z = float(torch.nn.functional.cosine_similarity(g, t, dim=0)) * g.numel() ** 0.5
            history = self.scores.setdefault(client.id, [])
            history.append(z)
            recent = history[-self.config.window :]
            if len(recent) == self.config.window and sum(recent) / len(recent) < self.config.z_threshold:
                self.detected_at[client.id] = step
                raise StepRejected(f"client {client.id}: head gradients unrelated to its task (hijacking)")
            return grad

        return check

    def install(self, session) -> None:
        for client in session.clients:
            client.gradient_hooks.append(self._hook(client))

    def report(self) -> dict:
        return {"detected": bool(self.detected_at), "detected_at_step": min(self.detected_at.values(), default=None),
                "clients_alarmed": sorted(self.detected_at), "window": self.config.window,
                "z_threshold": self.config.z_threshold}
