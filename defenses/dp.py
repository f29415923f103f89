"""Differential privacy on what leaves the client head: per-example clipping plus calibrated noise.

Mechanism. Each sequence's head output (the whole [T, H] activation over its real tokens) is clipped to norm
``clip`` = C (L2 for Gaussian, L1 for Laplace) and noise is added to every real position before it is sent.
The hook runs inside autograd, so the head still trains through the clipping (the noise is a constant).

Honest accounting. The server sees every release of a record's activation on its own, tied to that record;
there is no secrecy of sampling to amplify privacy, so the guarantee is that of a mechanism applied once per
release, composed over all releases of the record during training. Between any two inputs the clipped
outputs differ by at most 2C (both lie in the ball of radius C), so the sensitivity is Δ = 2C — not a
hard-coded constant. The hook counts the releases of every row it actually sends; the report takes the
most-released record.

* Gaussian (std = sigma · Δ): the composition of k Gaussian mechanisms with noise multiplier sigma, accounted
  with Opacus' RDP accountant (``sample_rate = 1``, ``noise_multiplier = sigma``, k steps) → (ε, δ).
* Laplace (scale b = sigma · Δ₁ per coordinate, L1 clipping): pure ε = Δ₁ / b = 1 / sigma per release;
  basic composition over k releases gives k / sigma.

``sigma = 0`` (no noise) gives ε = ∞; with ``clip = 0`` (no clipping) no finite sensitivity exists, so no
guarantee is reported either — the run still measures what the noise does to leakage and utility.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from suite.defense import Defense, DefenseConfig, register_defense
from suite.parties import Batch


@dataclass(frozen=True)
class DPConfig(DefenseConfig):
    sigma: float = 0.5  # noise multiplier: noise scale = sigma x sensitivity
    clip: float = 1.0  # per-example norm bound C; 0 = no clipping (then no guarantee)
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 = off), got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


class _DPHook:
    """Clip each sequence's activation and add noise; count releases per record."""

    def __init__(self, config: DPConfig, norm: int, generator: torch.Generator):
        self.config = config
        self.norm = norm  # 2 (Gaussian) or 1 (Laplace)
        self.generator = generator
        self.releases: Counter[tuple[int, ...]] = Counter()
        self.noise_sq_sum = 0.0
        self.noise_count = 0

    @property
    def sensitivity(self) -> float:
        return 2.0 * self.config.clip

    def __call__(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.attention_mask.unsqueeze(-1).to(out.dtype)
        for row in batch.input_ids[batch.attention_mask.bool().any(-1)]:
            self.releases[tuple(row.tolist())] += 1
        if self.config.clip > 0:
            norms = (out * mask).flatten(1).norm(p=self.norm, dim=1).clamp_min(1e-12)
            out = out * (self.config.clip / norms).clamp(max=1.0).view(-1, 1, 1)
        if self.config.sigma == 0:
            return out
        scale = self.config.sigma * (self.sensitivity if self.config.clip > 0 else 1.0)
        noise = self._noise(out.shape, scale).to(out.device, out.dtype) * mask  # drawn on the host, seeded
        self.noise_sq_sum += float((noise**2).sum())
        self.noise_count += int(mask.sum()) * out.shape[-1]
        return out + noise

    def _noise(self, shape: torch.Size, scale: float) -> torch.Tensor:
        if self.norm == 2:
            return torch.randn(shape, generator=self.generator) * scale
        u = torch.rand(shape, generator=self.generator) - 0.5  # Laplace by inverse CDF
        return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())

    def measured_std(self) -> float:
        return math.sqrt(self.noise_sq_sum / self.noise_count) if self.noise_count else 0.0


class _DPDefense(Defense):
    Config = DPConfig
    norm = 2

    def __init__(self, config: DPConfig | None = None):
        super().__init__(config)
        self.hooks: list[_DPHook] = []

    def install(self, session) -> None:
        for client in session.clients:
            gen = torch.Generator().manual_seed(self.config.seed * 1009 + client.id)
            hook = _DPHook(self.config, self.norm, gen)
            client.activation_hooks.append(hook)
            self.hooks.append(hook)

    def releases(self) -> int:
        """Releases of the most-released record (the one the guarantee has to cover)."""
        return max((max(h.releases.values(), default=0) for h in self.hooks), default=0)

    def epsilon(self) -> float:
        raise NotImplementedError

    def report(self) -> dict:
        noise = [h.measured_std() for h in self.hooks if h.noise_count]
        return {
            "sigma": self.config.sigma, "clip": self.config.clip, "delta": self.config.delta,
            "sensitivity": 2 * self.config.clip, "releases_per_record": self.releases(),
            "epsilon": self.epsilon(), "measured_noise_std": sum(noise) / len(noise) if noise else 0.0,
        }


@register_defense("dp_gaussian")
class GaussianDPDefense(_DPDefense):
    norm = 2

    def epsilon(self) -> float:
        k = self.releases()
        if self.config.sigma == 0 or self.config.clip == 0:
            return math.inf
        if k == 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.config.sigma, 1.0, k)]  # (noise multiplier, sample rate, steps)
        return float(accountant.get_epsilon(delta=self.config.delta))


@register_defense("dp_laplace")
class LaplaceDPDefense(_DPDefense):
    norm = 1

    def epsilon(self) -> float:
        if self.config.sigma == 0 or self.config.clip == 0:
            return math.inf
        return self.releases() / self.config.sigma  # pure epsilon, basic composition
