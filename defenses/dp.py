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

Noise source. Each client draws from its own ChaCha20 keystream keyed from ``os.urandom`` when the defense is
installed (``suite.engine.noise``): the server knows the config, so noise seeded from it, or from a generator
with a searchable seed, could be regenerated and subtracted. ``seed`` (an integer) is for reproducible tests
only, UNSAFE, and refused by ``splitleak serve``/``client``.

Floating point (Mironov 2012). Textbook Laplace sampling in floating point leaks the input through which
low-order bits of the output can occur, and a sampler built on finite-precision uniforms has a bounded
support (here |noise| ≤ 53 ln 2 · b ≈ 36.7 b), so far enough out some outputs are reachable from one input
and not from its neighbour. Laplace outputs are therefore *snapped*: the clipped value (|x_i| ≤ C) gets the
noise, the sum is rounded to the nearest multiple of Λ (the smallest power of two ≥ the noise scale b) and
clamped to ±B, B = Λ·floor((16 b − C) / Λ): well inside the support, so every output in [−B, B] is reachable
from every input. Each output is then a grid cell (or a clamped tail) whose preimage in the sampler's 2^52
uniforms holds at least c = 2^52 e^{−(B + C + Λ/2)/b} (1 − e^{−Λ/b}) − 1 points; rounding in log, scaling,
adding and rounding moves each cell boundary by under a point or two, so a cell's probability is the ideal
Laplace mass times (1 ± 4/c), and each coordinate costs ln((1 + 4/c)/(1 − 4/c)) on top of its share of
Δ₁ / b (about 4e-8 per coordinate at the default sizes). The report's ε includes that term for every
coordinate of a release. A sigma so small that B < Λ (C ≥ 16 b − Λ, about sigma < 1/30) gets no guarantee
(ε = ∞). Gaussian sampling is not snapped: floating-point attacks on it are not covered, and the report says
so.

Trained parts (the guarantee's premise). A release is a function of its record only if what produces it
does not depend on other records. With a trained client head, every later activation of *any* record
depends on record x through the head's weights, so per-record counting does not bound anything. The
default ``freeze = true`` therefore freezes the client head on install (and the tail too under
``direction = "both"``): the effective ``finetune`` of those parts is "frozen", and the report says so.
With ``freeze = false`` and a trainable head (or tail under "both") ε is reported as ∞ with
``guarantee = "none: the head is trained on the private data"``; DP-SGD for trained parts is ``dp_sgd``'s job.

Padding. Padding positions are released as exact zeros (no function of the record's content leaves there);
with ``hide_lengths`` they are noised like real positions instead and no mask is sent (below).

Which releases ε covers (``report()["covers"]``):

* ``direction = "activations"``: the head activations only. The gradient the tail sends back is a function
  of the record's tokens and goes out without noise: not covered.
* ``direction = "both"``: also the tail's gradient, clipped per sequence to ``grad_clip`` (default: ``clip``)
  and noised with the same ``sigma``. The gradient of the batch's mean loss scales each row by one over the
  real targets of the *whole batch*, which would make a row's release depend on the other records: it is
  rescaled to one over ``max_length - 1`` per row before clipping; it is accounted on its own (releases per record, ε) and composed with
  the activations into the total ε.
* ``hide_lengths``: no attention mask (and no positions) is sent; every sequence already has ``max_length``
  positions, the pad positions of *both* released tensors (activations and the tail's gradient) are noised
  like real ones, so the sequence length is inside the released tensors and covered. It therefore requires
  ``direction = "both"`` and ``sigma > 0``: otherwise the gradient the tail returns (exactly zero from each
  sequence's last real token on) or the un-noised padding would show every length, and the config is
  refused. The server computes exactly the same result: with right padding and causal attention no real
  token ever attends to a pad, so it may treat every position as real. Without it the mask (every
  sequence's length) crosses in the clear: not covered.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

import torch

from suite.engine.noise import NoiseStream, as_stream, client_stream
from suite.engine.parties import Batch, make_optimizer, trainable
from suite.errors import ConfigError
from suite.interfaces.defense import Defense, DefenseConfig, register_defense

SNAP_SUPPORT = 16.0  # the Laplace clamp B sits inside 16 noise scales (probability beyond: e^-15 at most)


@dataclass(frozen=True)
class DPConfig(DefenseConfig):
    sigma: float = 0.5  # noise multiplier: noise scale = sigma x sensitivity
    clip: float = 1.0  # per-example norm bound C; 0 = no clipping (then no guarantee)
    # C from public text instead: this quantile of the per-sequence norms of the public head's outputs on the
    # shadow text (``calibrate``; never the private data), so sigma means the same at every split and model
    clip_quantile: float | None = None
    delta: float = 1e-5
    direction: str = "activations"  # "activations" or "both" (also the gradient the tail sends)
    grad_clip: float | None = None  # per-sequence norm bound of the tail gradient ("both"); None = clip
    hide_lengths: bool = False  # send no attention mask; noise the pad positions too (needs "both", sigma > 0)
    freeze: bool = True  # freeze the client head (and tail under "both"): the premise of the per-record ε
    seed: int | None = None  # UNSAFE, tests only: fixes the noise (None = fresh OS randomness per client)

    def __post_init__(self) -> None:
        if self.direction not in ("activations", "both"):
            raise ValueError(f"direction must be 'activations' or 'both', not {self.direction!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        for name in ("sigma", "clip", "delta", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.clip_quantile is not None and not 0 < self.clip_quantile <= 1:
            raise ValueError(f"clip_quantile must be in (0, 1] (e.g. 0.5: the median norm), got {self.clip_quantile}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 = off), got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.hide_lengths and self.direction != "both":
            raise ValueError("hide_lengths needs direction = 'both': the un-noised gradient the tail returns is "
                             "exactly zero from each sequence's last real token on and shows every length")
        if self.hide_lengths and self.sigma == 0:
            raise ValueError("hide_lengths needs sigma > 0: un-noised padding shows every length")
        if self.hide_lengths and (self.clip == 0 or self.grad_clip == 0):
            raise ValueError("hide_lengths needs clip > 0 and grad_clip > 0: unclipped releases have no finite "
                             "sensitivity, so nothing (the lengths included) is covered")


class _DPHook:
    """Clip each sequence's tensor (head activation or tail gradient) and add noise; count releases per
    record. Pad positions leave as zeros, or (``hide_lengths``) noised like the real ones."""

    def __init__(self, config: DPConfig, norm: int, stream: NoiseStream, clip: float | None = None,
                 releases: Counter | None = None, tail: bool = False):
        if not isinstance(stream, NoiseStream):  # a torch.Generator's seed can be searched (torch keeps 32 bits)
            raise TypeError(f"DP noise comes from a NoiseStream, not a {type(stream).__name__}")
        self.config = config
        self.norm = norm  # 2 (Gaussian) or 1 (Laplace)
        self.stream = stream
        self.clip = config.clip if clip is None else clip
        # Releases per record, shared by every client's hook of one kind: a record two clients hold is one
        # record released by both.
        self.releases: Counter[tuple[int, ...]] = releases if releases is not None else Counter()
        # The tail's gradient of the batch-mean loss scales each row by 1 / (real targets of the whole batch):
        # rescaled to 1 / (max_length - 1) per row, a row's release depends on its own record only.
        self.tail = tail
        self.noise_sq_sum = 0.0
        self.noise_count = 0
        self.coordinates = 0  # the most coordinates one record's release had (for the snapping term)

    @property
    def sensitivity(self) -> float:
        return 2.0 * self.clip

    def __call__(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.attention_mask.unsqueeze(-1).to(out.dtype)
        for row in batch.input_ids[batch.attention_mask.bool().any(-1)]:
            self.releases[tuple(row.tolist())] += 1
        out = out * mask  # padding carries nothing of the record
        if self.tail and out.shape[1] > 1:
            targets = int((batch.labels[:, 1:] != -100).sum())
            out = out * (targets / (out.shape[1] - 1))
        if self.clip > 0:
            out = self._clipped(out)
        if self.config.sigma == 0:
            return out
        scale = self.config.sigma * (self.sensitivity if self.clip > 0 else 1.0)
        where = torch.ones_like(mask) if self.config.hide_lengths else mask
        self.coordinates = max(self.coordinates, int(where.sum(1).max()) * out.shape[-1] if len(where) else 0)
        if self.norm == 2:
            noise = (self.stream.normal(out.shape) * scale).to(out.device, out.dtype) * where  # drawn on the host
            noised = out + noise
        else:
            noised = torch.where(where.bool(), self._snapped_laplace(out, scale), out)
            noise = (noised - out) * where
        self.noise_sq_sum += float((noise.float() ** 2).sum())
        self.noise_count += int(where.sum()) * out.shape[-1]
        return noised

    def _clipped(self, out: torch.Tensor) -> torch.Tensor:
        """Each sequence scaled to norm at most ``clip`` *as sent*: the norm is taken in float32 or better and
        the target shrunk by a few ulps of the tensor's dtype, then checked again in float64 after the cast
        (bf16 rounding alone would otherwise exceed the bound by up to ~0.5 %)."""
        margin = 1.0 - 4 * torch.finfo(out.dtype).eps
        norms = out.float().flatten(1).norm(p=self.norm, dim=1).clamp_min(1e-30)
        clipped = out * (self.clip * margin / norms).clamp(max=1.0).to(out.dtype).view(-1, 1, 1)
        for _ in range(8):  # still over after the cast (never seen with this margin): shrink those rows again
            sent = clipped.detach().double().flatten(1).norm(p=self.norm, dim=1)
            if not bool((sent > self.clip).any()):
                return clipped
            clipped = clipped * (self.clip * margin / sent).clamp(max=1.0).to(out.device, out.dtype).view(-1, 1, 1)
        raise RuntimeError(f"cannot clip to norm {self.clip} in {out.dtype}")

    def _snapped_laplace(self, out: torch.Tensor, scale: float) -> torch.Tensor:
        """The snapping mechanism per coordinate (module docstring): add Laplace(scale), round to a multiple
        of Λ, clamp to ±B, in float64; the noise is a constant for autograd (the head trains through the
        clipped value, as under Gaussian noise)."""
        lam, bound = snap_grid(scale, self.clip)
        value = out.detach().double().cpu()
        snapped = (torch.round((value + scale * self.stream.laplace(out.shape)) / lam) * lam).clamp(-bound, bound)
        return snapped.to(out.device, out.dtype) + (out - out.detach())  # exactly the snapped value, forward

    def measured_std(self) -> float:
        return math.sqrt(self.noise_sq_sum / self.noise_count) if self.noise_count else 0.0


def snap_grid(scale: float, clip: float) -> tuple[float, float]:
    """Λ (the smallest power of two ≥ ``scale``) and the clamp bound B (a multiple of Λ inside the sampler's
    support; < Λ when ``clip`` is too large for the scale: no guarantee)."""
    lam = 2.0 ** math.ceil(math.log2(scale))
    return lam, lam * math.floor((SNAP_SUPPORT * scale - clip) / lam)


def snap_term(scale: float, clip: float) -> float:
    """The ε each snapped coordinate costs beyond its share of Δ₁ / b (module docstring); ∞ without a grid."""
    lam, bound = snap_grid(scale, clip)
    if bound < lam:
        return math.inf
    cells = 2.0**52 * math.exp(-(bound + clip + lam / 2) / scale) * -math.expm1(-lam / scale) - 1
    return math.log((1 + 4 / cells) / (1 - 4 / cells)) if cells > 4 else math.inf


class _DPDefense(Defense):
    Config = DPConfig
    norm = 2
    secret_fields = frozenset({"seed"})  # the noise seed; sigma, clip, delta are public

    def __init__(self, config: DPConfig | None = None):
        super().__init__(config)
        self.hooks: list[_DPHook] = []  # head activations, one per client
        self.grad_hooks: list[_DPHook] = []  # tail gradients ("both"), one per client
        self.trained_parts: list[str] = []  # parts that kept training under freeze = false (no guarantee)
        self.noise_source = "os_random" if self.config.seed is None else "fixed_seed_UNSAFE"
        self.calibrated = False  # clip_quantile: set by ``calibrate`` before ``install``

    def calibrate(self, head, input_ids, attention_mask) -> None:
        """``clip_quantile``: set C to that quantile of the per-sequence norms (L2, or L1 for Laplace) of
        ``head``'s outputs on public text (the shadow records; padding zeroed, as the hook sends it). C is then
        a public parameter like any other: the attacker's ``public_params`` carry the calibrated value."""
        if self.config.clip_quantile is None:
            return
        plain = super().simulate_release(head, input_ids, attention_mask, None)
        plain = plain * attention_mask.unsqueeze(-1).to(plain.dtype)
        norms = plain.float().flatten(1).norm(p=self.norm, dim=1)
        clip = float(torch.quantile(norms.double(), self.config.clip_quantile))
        self.config = dataclasses.replace(self.config, clip=clip)
        self.calibrated = True

    def install(self, session) -> None:
        if self.config.clip_quantile is not None and not self.calibrated:
            raise ConfigError("dp: clip_quantile needs public text to calibrate the clip on (the matrix runner "
                              "does this); elsewhere give clip = a number instead")
        self.trained_parts = []
        counts: Counter = Counter()  # releases per record, across every client (a record two clients hold)
        grad_counts: Counter = Counter()
        for client in session.clients:
            stream = client_stream(self.config.seed, client.id)
            self.noise_source = stream.source
            self._freeze(client)
            hook = _DPHook(self.config, self.norm, stream, releases=counts)
            client.activation_hooks.append(hook)
            self.hooks.append(hook)
            if self.config.direction == "both":
                grad_hook = _DPHook(self.config, self.norm, stream, clip=self._grad_clip(), releases=grad_counts,
                                    tail=True)
                client.tail_gradient_hooks.append(grad_hook)
                self.grad_hooks.append(grad_hook)
            if self.config.hide_lengths:
                client.hide_lengths = True

    def _parts(self, client) -> dict:
        """The client parts whose training would break the per-record premise of ε."""
        return {"head": client.head, **({"tail": client.tail} if self.config.direction == "both" else {})}

    def _freeze(self, client) -> None:
        """Freeze the parts the guarantee needs frozen (``freeze``), or record which of them train."""
        parts = self._parts(client)
        if not self.config.freeze:
            self.trained_parts = sorted(set(self.trained_parts)
                                        | {n for n, p in parts.items() if any(q.requires_grad for q in p.parameters())})
            return
        for part in parts.values():
            part.requires_grad_(False)
        params = trainable((client.head, client.tail))
        lr = client.optimizer.param_groups[0]["lr"] if client.optimizer is not None else 0.0
        client.optimizer = make_optimizer(params, lr) if params else None

    def simulate_release(self, head, input_ids, attention_mask, generator):
        """The attacker's shadow activations clipped and noised by the same hook the clients install (same
        public sigma / clip / norm), its noise drawn from a stream keyed by the attacker's ``generator``,
        never the clients'."""
        plain = super().simulate_release(head, input_ids, attention_mask, generator)
        hook = _DPHook(self.config, self.norm, as_stream(generator))
        with torch.no_grad():
            return hook(plain, Batch(input_ids, attention_mask, input_ids))

    def public_params(self) -> dict:
        """With the derived default filled in (``grad_clip`` None is ``clip``): one setting, one hash."""
        params = super().public_params()
        params["grad_clip"] = self._grad_clip()
        return params

    def _grad_clip(self) -> float:
        return self.config.clip if self.config.grad_clip is None else self.config.grad_clip

    def _largest_release(self, clip: float, hidden_size: int) -> float:
        """The largest L2 norm one position of an honest release can have, from the public parameters: the
        clipped value (at most ``clip``) plus the noise, Gaussian ``scale``·χ_H below ``scale``·(√H + 10)
        (fails with probability under e^-50), snapped Laplace clamped to ±B per coordinate."""
        scale = self.config.sigma * (2 * clip if clip > 0 else 1.0)
        if self.norm == 1 and clip > 0 and self.config.sigma > 0:
            lam, bound = snap_grid(scale, clip)
            return max(bound, lam) * hidden_size ** 0.5
        return (clip if clip > 0 else 0.0) + scale * (hidden_size ** 0.5 + 10)

    def server_bounds(self, bounds, hidden_size: int):
        """Noised releases may exceed the public-text magnitude bound a server holds messages to: the
        activation bound (and the gradient bound under "both") is widened to what an honest release can
        reach (``_largest_release``), added to the public-text bound when nothing is clipped."""
        import dataclasses

        def widened(old: float | None, clip: float) -> float | None:
            if old is None:
                return None
            reach = self._largest_release(clip, hidden_size)
            return old + reach if clip == 0 else max(old, reach)

        grad = bounds.gradient_norm
        if self.config.direction == "both":
            grad = widened(grad, self._grad_clip())
        return dataclasses.replace(bounds, activation_norm=widened(bounds.activation_norm, self.config.clip),
                                   gradient_norm=grad)

    def releases(self, hooks: list[_DPHook] | None = None) -> int:
        """Releases of the most-released record (the one the guarantee has to cover)."""
        hooks = self.hooks if hooks is None else hooks
        return max((max(h.releases.values(), default=0) for h in hooks), default=0)

    def _coordinates(self, hooks: list[_DPHook]) -> int:
        return max((h.coordinates for h in hooks), default=0)

    def _kinds(self) -> list[tuple[float, int, int]]:
        """(clip, releases per record, coordinates per release) of each kind of release that is noised."""
        kinds = [(self.config.clip, self.releases(), self._coordinates(self.hooks))]
        if self.config.direction == "both":
            kinds.append((self._grad_clip(), self.releases(self.grad_hooks), self._coordinates(self.grad_hooks)))
        return kinds

    def guarantee(self) -> str:
        """Whether ε is a guarantee: not when a part the releases depend on trained on the private data."""
        if self.trained_parts:
            return f"none: the {' and '.join(self.trained_parts)} trained on the private data (freeze = false)"
        if self.config.sigma == 0 or any(clip == 0 for clip, k, _ in self._kinds() if k):
            return "none: no noise or no clipping"
        if math.isinf(self._epsilon(self._kinds())):
            return "none: sigma too small for the snapped Laplace sampler's grid (B < Λ)"
        return "per record, " + ("pure ε" if self.norm == 1 else f"(ε, δ = {self.config.delta:g})")

    def epsilon(self) -> float:
        """ε of everything this defense noises (activations, plus tail gradients under "both"); ∞ when the
        premise does not hold (a trained head or tail, no noise, no clipping)."""
        return math.inf if self.trained_parts else self._epsilon(self._kinds())

    def _epsilon(self, parts: list[tuple[float, int, int]]) -> float:
        """ε of the composition of ``parts``: (clip, releases per record, coordinates) of each kind."""
        raise NotImplementedError

    def covers(self) -> str:
        if not self.guarantee().startswith("per record"):
            return f"covers: nothing formally ({self.guarantee().removeprefix('none: ')})"
        k = self.releases()
        covered = [f"head activations ({k} releases/record)"]
        missing = []
        if self.config.direction == "both":
            covered.append(f"tail gradients ({self.releases(self.grad_hooks)} releases/record)")
        else:
            missing.append("tail gradients")
        (covered if self.config.hide_lengths else missing).append("sequence lengths")
        if self.norm == 2:
            missing.append("floating-point attacks on Gaussian sampling")
        return f"covers: {', '.join(covered)}; not covered: {', '.join(missing)}"

    def report(self) -> dict:
        noise = [h.measured_std() for h in self.hooks if h.noise_count]
        kinds = self._kinds()
        report = {
            "sigma": self.config.sigma, "clip": self.config.clip, "clip_quantile": self.config.clip_quantile,
            "delta": self.config.delta,
            "sensitivity": 2 * self.config.clip, "releases_per_record": self.releases(),
            "epsilon": self.epsilon(), "measured_noise_std": sum(noise) / len(noise) if noise else 0.0,
            "epsilon_activations": math.inf if self.trained_parts else self._epsilon(kinds[:1]),
            "guarantee": self.guarantee(), "covers": self.covers(), "hide_lengths": self.config.hide_lengths,
            "frozen_for_guarantee": sorted(self._part_names()) if self.config.freeze else [],
            "noise_source": self.noise_source,
        }
        if self.norm == 1:
            lam, bound = snap_grid(self.config.sigma * 2 * self.config.clip, self.config.clip)
            report["floating_point"] = (f"snapped (Mironov 2012): rounded to multiples of Λ = {lam:g} and clamped "
                                        f"to ±{bound:g}, inside the sampler's support; ε includes "
                                        f"{snap_term(self.config.sigma * 2 * self.config.clip, self.config.clip):.2g} "
                                        "per coordinate")
        if self.config.direction == "both":
            report["grad_clip"] = self._grad_clip()
            report["grad_releases_per_record"] = self.releases(self.grad_hooks)
            report["epsilon_gradients"] = math.inf if self.trained_parts else self._epsilon(kinds[1:])
        return report

    def inference_report(self, releases: int, coordinates: int, training_releases: int) -> dict:
        """ε at inference: one generation releases the prompt's activation and then each sent
        token's, each clipped and noised on its own, so ``releases`` mechanisms compose per generation (a
        record that is also a training record composes with its ``training_releases`` too)."""
        kind = [(self.config.clip, releases, coordinates)]
        both = [(self.config.clip, releases + training_releases, coordinates)]
        return {"releases_per_generation": releases,
                "epsilon_per_generation": math.inf if self.trained_parts else self._epsilon(kind),
                "epsilon_with_training": math.inf if self.trained_parts else self._epsilon(both),
                "covers": "head activations of the prompt and of every sent token; not the token count"}

    def _part_names(self) -> set[str]:
        return {"head", "tail"} if self.config.direction == "both" else {"head"}


@register_defense("dp_gaussian")
class GaussianDPDefense(_DPDefense):
    norm = 2

    def _epsilon(self, parts: list[tuple[float, int, int]]) -> float:
        if self.config.sigma == 0 or any(clip == 0 for clip, k, _ in parts if k):
            return math.inf
        history = [(self.config.sigma, 1.0, k) for _, k, _ in parts if k]  # (noise multiplier, rate, steps)
        if not history:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = history
        return float(accountant.get_epsilon(delta=self.config.delta))


@register_defense("dp_laplace")
class LaplaceDPDefense(_DPDefense):
    norm = 1

    def _epsilon(self, parts: list[tuple[float, int, int]]) -> float:
        """Pure ε, basic composition over releases; each release is 1/sigma (= Δ₁ / b) plus the snapping
        term (``snap_term``) for each of its coordinates."""
        if self.config.sigma == 0 or any(clip == 0 for clip, k, _ in parts if k):
            return math.inf
        total = 0.0
        for clip, k, coordinates in parts:
            if k:
                total += k * (1 / self.config.sigma + coordinates * snap_term(self.config.sigma * 2 * clip, clip))
        return total
