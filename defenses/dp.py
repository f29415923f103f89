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

Noise source. Each client draws from its own generator seeded from the OS CSPRNG (``secrets``) when the
defense is installed (``suite.interfaces.defense.client_generator``): the server knows the config, so noise seeded from
it could be regenerated and subtracted. ``seed`` (an integer) is for reproducible tests only, UNSAFE, and
refused by ``splitleak serve``/``client``.

Padding. Padding positions are released as exact zeros (no function of the record's content leaves there);
with ``hide_lengths`` they are noised like real positions instead and no mask is sent (below).

Which releases ε covers (``report()["covers"]``):

* ``direction = "activations"``: the head activations only. The gradient the tail sends back is a function
  of the record's tokens and goes out without noise: not covered.
* ``direction = "both"``: also the tail's gradient, clipped per sequence to ``grad_clip`` (default: ``clip``)
  and noised with the same ``sigma``; it is accounted on its own (releases per record, ε) and composed with
  the activations into the total ε.
* ``hide_lengths``: no attention mask (and no positions) is sent; every sequence already has ``max_length``
  positions, the pad positions are noised like real ones, so the sequence length is inside the released
  tensor and covered. The server computes exactly the same result: with right padding and causal attention
  no real token ever attends to a pad, so it may treat every position as real. Without it the mask (every
  sequence's length) crosses in the clear: not covered.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from suite.engine.parties import Batch
from suite.interfaces.defense import Defense, DefenseConfig, client_generator, register_defense


@dataclass(frozen=True)
class DPConfig(DefenseConfig):
    sigma: float = 0.5  # noise multiplier: noise scale = sigma x sensitivity
    clip: float = 1.0  # per-example norm bound C; 0 = no clipping (then no guarantee)
    delta: float = 1e-5
    direction: str = "activations"  # "activations" or "both" (also the gradient the tail sends)
    grad_clip: float | None = None  # per-sequence norm bound of the tail gradient ("both"); None = clip
    hide_lengths: bool = False  # send no attention mask; noise the pad positions too (lengths covered)
    seed: int | None = None  # UNSAFE, tests only: fixes the noise (None = fresh OS randomness per client)

    def __post_init__(self) -> None:
        if self.direction not in ("activations", "both"):
            raise ValueError(f"direction must be 'activations' or 'both', not {self.direction!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 = off), got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


class _DPHook:
    """Clip each sequence's tensor (head activation or tail gradient) and add noise; count releases per
    record. Pad positions leave as zeros, or (``hide_lengths``) noised like the real ones."""

    def __init__(self, config: DPConfig, norm: int, generator: torch.Generator, clip: float | None = None):
        self.config = config
        self.norm = norm  # 2 (Gaussian) or 1 (Laplace)
        self.generator = generator
        self.clip = config.clip if clip is None else clip
        self.releases: Counter[tuple[int, ...]] = Counter()
        self.noise_sq_sum = 0.0
        self.noise_count = 0

    @property
    def sensitivity(self) -> float:
        return 2.0 * self.clip

    def __call__(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.attention_mask.unsqueeze(-1).to(out.dtype)
        for row in batch.input_ids[batch.attention_mask.bool().any(-1)]:
            self.releases[tuple(row.tolist())] += 1
        out = out * mask  # padding carries nothing of the record
        if self.clip > 0:
            norms = out.flatten(1).norm(p=self.norm, dim=1).clamp_min(1e-12)
            out = out * (self.clip / norms).clamp(max=1.0).view(-1, 1, 1)
        if self.config.sigma == 0:
            return out
        scale = self.config.sigma * (self.sensitivity if self.clip > 0 else 1.0)
        where = torch.ones_like(mask) if self.config.hide_lengths else mask
        noise = self._noise(out.shape, scale).to(out.device, out.dtype) * where  # drawn on the host
        self.noise_sq_sum += float((noise**2).sum())
        self.noise_count += int(where.sum()) * out.shape[-1]
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
    secret_fields = frozenset({"seed"})  # the noise seed; sigma, clip, delta are public

    def __init__(self, config: DPConfig | None = None):
        super().__init__(config)
        self.hooks: list[_DPHook] = []  # head activations, one per client
        self.grad_hooks: list[_DPHook] = []  # tail gradients ("both"), one per client

    def install(self, session) -> None:
        for client in session.clients:
            gen = client_generator(self.config.seed, client.id)
            hook = _DPHook(self.config, self.norm, gen)
            client.activation_hooks.append(hook)
            self.hooks.append(hook)
            if self.config.direction == "both":
                grad_hook = _DPHook(self.config, self.norm, gen, clip=self._grad_clip())
                client.tail_gradient_hooks.append(grad_hook)
                self.grad_hooks.append(grad_hook)
            if self.config.hide_lengths:
                client.hide_lengths = True

    def simulate_release(self, head, input_ids, attention_mask, generator):
        """The attacker's shadow activations clipped and noised by the same hook the clients install (same
        public sigma / clip / norm), its noise drawn from the attacker's ``generator``, never the clients'."""
        plain = super().simulate_release(head, input_ids, attention_mask, generator)
        hook = _DPHook(self.config, self.norm, generator)
        with torch.no_grad():
            return hook(plain, Batch(input_ids, attention_mask, input_ids))

    def _grad_clip(self) -> float:
        return self.config.clip if self.config.grad_clip is None else self.config.grad_clip

    def releases(self, hooks: list[_DPHook] | None = None) -> int:
        """Releases of the most-released record (the one the guarantee has to cover)."""
        hooks = self.hooks if hooks is None else hooks
        return max((max(h.releases.values(), default=0) for h in hooks), default=0)

    def epsilon(self) -> float:
        """ε of everything this defense noises (activations, plus tail gradients under "both")."""
        return self._epsilon([(self.config.clip, self.releases())]
                             + ([(self._grad_clip(), self.releases(self.grad_hooks))]
                                if self.config.direction == "both" else []))

    def _epsilon(self, parts: list[tuple[float, int]]) -> float:
        """ε of the composition of ``parts``: (clip, releases per record) of each kind of release."""
        raise NotImplementedError

    def covers(self) -> str:
        k = self.releases()
        covered = [f"head activations ({k} releases/record)"]
        missing = []
        if self.config.direction == "both":
            covered.append(f"tail gradients ({self.releases(self.grad_hooks)} releases/record)")
        else:
            missing.append("tail gradients")
        (covered if self.config.hide_lengths else missing).append("sequence lengths")
        return f"covers: {', '.join(covered)}; not covered: {', '.join(missing) or 'nothing else crosses'}"

    def report(self) -> dict:
        noise = [h.measured_std() for h in self.hooks if h.noise_count]
        report = {
            "sigma": self.config.sigma, "clip": self.config.clip, "delta": self.config.delta,
            "sensitivity": 2 * self.config.clip, "releases_per_record": self.releases(),
            "epsilon": self.epsilon(), "measured_noise_std": sum(noise) / len(noise) if noise else 0.0,
            "epsilon_activations": self._epsilon([(self.config.clip, self.releases())]),
            "covers": self.covers(), "hide_lengths": self.config.hide_lengths,
            "noise_source": "os_random" if self.config.seed is None else "fixed_seed_UNSAFE",
        }
        if self.config.direction == "both":
            report["grad_clip"] = self._grad_clip()
            report["grad_releases_per_record"] = self.releases(self.grad_hooks)
            report["epsilon_gradients"] = self._epsilon([(self._grad_clip(), self.releases(self.grad_hooks))])
        return report


@register_defense("dp_gaussian")
class GaussianDPDefense(_DPDefense):
    norm = 2

    def _epsilon(self, parts: list[tuple[float, int]]) -> float:
        if self.config.sigma == 0 or any(clip == 0 for clip, k in parts if k):
            return math.inf
        history = [(self.config.sigma, 1.0, k) for _, k in parts if k]  # (noise multiplier, rate, steps)
        if not history:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = history
        return float(accountant.get_epsilon(delta=self.config.delta))


@register_defense("dp_laplace")
class LaplaceDPDefense(_DPDefense):
    norm = 1

    def _epsilon(self, parts: list[tuple[float, int]]) -> float:
        if self.config.sigma == 0 or any(clip == 0 for clip, k in parts if k):
            return math.inf
        return sum(k for _, k in parts) / self.config.sigma  # pure epsilon, basic composition
