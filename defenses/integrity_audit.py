"""Integrity audit of the server's computation: catch a server that tampers with what it returns.

Lu et al. (2023) recompute every pipeline stage on a redundant copy — 100 % detection for 100 % extra
compute. This defense gets the same catch rate on whole-tensor tampering for a few percent, with two
detectors run by a verifier on the client side that holds a commitment to the server's trunk weights (in
one process: the server's current weights, before its optimiser step of that step):

1. Randomised recomputation.
   * Every step, a *spot check*: recompute the trunk on the first 1..``spot_tokens`` positions of one random
     real sequence. Under causal attention those outputs depend on that prefix only, so the check costs
     ``spot_tokens`` tokens of one forward pass, and any tampering that touches every element of the
     returned hidden states (sign flip, random replacement, additive noise) changes the checked values.
   * With probability ``audit_rate``, a *full audit*: recompute the hidden states of the whole batch and the
     gradient for the head (forward + backward of the trunk with the committed weights and the gradient the
     tail sent), and compare both.
2. A structural invariant, free: the causal-LM loss never uses the output at a sequence's last real
   position (it would predict padding) nor at padding, so an honest gradient for the head is exactly zero
   there. Noise or random values spread over the whole returned gradient break it at once.
3. Statistical monitoring (in the spirit of SENTINEL): for the gradient returned to the head, its cosine to
   the gradient the tail sent — positive and slowly drifting over honest training because the trunk is a
   stack of residual blocks. A cosine below ``min_cosine`` flags the step; after ``warmup`` steps so does a
   robust z-score (median / MAD of the last accepted steps) above ``z_threshold``.

What is caught: hidden-state tampering of every mode at every step (spot check); gradient sign flips
(statistics), random replacement and additive noise (invariant, statistics) at every step. A server that
tampers only where the cheap checks do not look (positions past the spot-checked prefix, gradients that keep
the invariant and the cosine) is caught only by the full audit, i.e. with probability ``audit_rate`` per
tampered step: recomputing whole gradients is what costs.
A flagged step is rejected (the client skips its update) and training continues.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from suite.defense import Defense, DefenseConfig, register_defense
from suite.parties import Batch, StepRejected, trainable
from suite.split import position_ids_for


@dataclass(frozen=True)
class IntegrityAuditConfig(DefenseConfig):
    audit_rate: float = 0.05  # probability of a full recomputation per step
    spot_tokens: int = 2  # positions of one sequence recomputed every step
    z_threshold: float = 6.0
    min_cosine: float = 0.1  # an honest head gradient points along the tail gradient (residual blocks)
    warmup: int = 5  # honest steps before the statistics may flag
    rtol: float = 1e-3  # recomputation tolerance, relative to the tensor's scale
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.audit_rate <= 1:
            raise ValueError(f"audit_rate must be in [0, 1], got {self.audit_rate}")
        if self.spot_tokens < 0 or self.warmup < 1 or self.z_threshold <= 0 or self.rtol <= 0:
            raise ValueError("spot_tokens >= 0, warmup >= 1, z_threshold > 0 and rtol > 0 are required")


@dataclass
class _Running:
    """Median and median absolute deviation of the last ``window`` accepted values: follows the slow drift of
    honest training and is not dragged by the outliers it is meant to catch (even during warm-up, where up
    to half the values may be tampered). ``floor`` is the smallest spread assumed."""

    floor: float
    window: int = 25
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    def z(self, x: float) -> float:
        center = statistics.median(self.values)
        mad = statistics.median(abs(v - center) for v in self.values)
        return abs(x - center) / max(1.4826 * mad, self.floor)

    def add(self, x: float) -> None:
        self.values = [*self.values[-(self.window - 1) :], x]


@dataclass
class _ClientState:
    audit: bool = False
    snapshot: list[torch.Tensor] | None = None
    # cosine of the head gradient to the tail gradient: positive and slowly drifting in honest training
    # (residual blocks pass the gradient through), < 0 when flipped, ~0 when replaced. (Norm ratios drift
    # too fast while the tail's loss falls to be a usable statistic.)
    stats: dict[str, _Running] = field(default_factory=lambda: {"cos": _Running(0.05)})


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    scale = float(want.abs().mean()) + 1e-12
    return float((got - want).abs().max()) <= rtol * max(scale, float(want.abs().max()) * 1e-2) + 1e-7


@register_defense("integrity_audit")
class IntegrityAuditDefense(Defense):
    Config = IntegrityAuditConfig

    def __init__(self, config: IntegrityAuditConfig | None = None):
        super().__init__(config)
        self.rng = random.Random(self.config.seed)
        self.flags: list[dict] = []  # {"client", "step", "detector", "what"}
        self.served_units = 0.0  # token-passes the server computed (forward = 1, backward = 2)
        self.recomputed_units = 0.0
        self.audit_seconds = 0.0

    # --- verifier ----------------------------------------------------------------------------------

    def _flag(self, client, step: int, detector: str, what: str) -> None:
        self.flags.append({"client": client.id, "step": step, "detector": detector, "what": what})
        raise StepRejected(f"{detector} flagged the {what} of step {step}")

    def _check_hidden(self, server, client, state: _ClientState, step: int, hidden: torch.Tensor,
                      batch: Batch) -> torch.Tensor:
        start = time.perf_counter()
        sent, mask = client.sent_activation, batch.attention_mask
        tokens = int(mask.sum())
        self.served_units += 3 * tokens
        state.audit = self.rng.random() < self.config.audit_rate
        server.activate_for(client.id)
        try:
            with torch.no_grad():
                if state.audit:
                    state.snapshot = [p.detach().clone() for p in trainable([server.trunk])]
                    want = server.trunk(sent, mask, position_ids_for(mask))
                    self.recomputed_units += tokens
                    real = mask.bool()
                    if not _close(hidden[real], want[real], self.config.rtol):
                        self._flag(client, step, "full_audit", "hidden states")
                rows = [i for i in range(mask.shape[0]) if mask[i, 0]]
                if self.config.spot_tokens and rows:
                    r = self.rng.choice(rows)
                    length = min(self.rng.randint(1, self.config.spot_tokens), int(mask[r].sum()))
                    m = mask[r : r + 1, :length]
                    want = server.trunk(sent[r : r + 1, :length], m, position_ids_for(m))
                    self.recomputed_units += length
                    if not _close(hidden[r : r + 1, :length], want, self.config.rtol):
                        self._flag(client, step, "spot_check", "hidden states")
        finally:
            self.audit_seconds += time.perf_counter() - start
        return hidden

    def _check_gradient(self, server, client, state: _ClientState, step: int, grad: torch.Tensor,
                        head_out: torch.Tensor, batch: Batch) -> torch.Tensor:
        start = time.perf_counter()
        try:
            mask = batch.attention_mask.bool()
            tail_grad = client.sent_gradient
            if state.audit and state.snapshot is not None and tail_grad is not None:
                want = self._recompute_gradient(server, client, state.snapshot, head_out, batch, tail_grad)
                self.recomputed_units += 3 * int(mask.sum())
                state.snapshot = None
                if not _close(grad[mask], want[mask], self.config.rtol):
                    self._flag(client, step, "full_audit", "head gradient")
            # Structural invariant: the loss never uses the output at the last real position (it would
            # predict a padding token) nor at padding, so an honest head gradient is exactly zero there.
            last = mask.sum(1, keepdim=True) - 1
            silent = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) >= last
            if bool(silent.any()) and float(grad[silent].abs().max()) != 0.0:
                self._flag(client, step, "invariant", "head gradient")
            if tail_grad is not None:
                g, t = grad[mask].flatten(), tail_grad[mask].flatten()
                values = {"cos": float(torch.nn.functional.cosine_similarity(g, t, dim=0))}
                if values["cos"] < self.config.min_cosine:
                    self._flag(client, step, "statistics", "head gradient")
                if all(s.n >= self.config.warmup for s in state.stats.values()):
                    worst = max(state.stats[k].z(v) for k, v in values.items())
                    if worst > self.config.z_threshold:
                        self._flag(client, step, "statistics", "head gradient")
                for k, v in values.items():
                    state.stats[k].add(v)
        finally:
            self.audit_seconds += time.perf_counter() - start
        return grad

    @staticmethod
    def _recompute_gradient(server, client, snapshot, head_out, batch, tail_grad) -> torch.Tensor:
        """The head gradient an honest server would have sent: trunk backward with the committed weights."""
        params = trainable([server.trunk])
        current = [p.detach().clone() for p in params]
        server.activate_for(client.id)
        with torch.no_grad():
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
        try:
            x = head_out.detach().clone().requires_grad_(True)
            mask = batch.attention_mask
            out = server.trunk(x, mask, position_ids_for(mask))
            (grad,) = torch.autograd.grad(out, x, tail_grad)
        finally:
            with torch.no_grad():
                for p, c in zip(params, current, strict=True):
                    p.copy_(c)
        return grad

    # --- wiring ------------------------------------------------------------------------------------

    def install(self, session) -> None:
        server = session.server
        for client in session.clients:
            state = _ClientState()

            def hidden_hook(step, hidden, batch, client=client, state=state):
                return self._check_hidden(server, client, state, step, hidden, batch)

            def gradient_hook(step, grad, head_out, batch, client=client, state=state):
                return self._check_gradient(server, client, state, step, grad, head_out, batch)

            client.hidden_hooks.append(hidden_hook)
            client.gradient_hooks.append(gradient_hook)

    def flagged_steps(self) -> set[tuple[int, str]]:
        """(step, "hidden" | "gradient") pairs that were rejected."""
        return {(f["step"], "hidden" if f["what"] == "hidden states" else "gradient") for f in self.flags}

    def report(self) -> dict:
        by = {}
        for f in self.flags:
            by[f["detector"]] = by.get(f["detector"], 0) + 1
        return {"audit_rate": self.config.audit_rate, "spot_tokens": self.config.spot_tokens,
                "flagged": len(self.flags), "flagged_by": by,
                "extra_compute": self.recomputed_units / self.served_units if self.served_units else 0.0}
