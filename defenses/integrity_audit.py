"""Integrity audit of the server's computation: catch a server that tampers with what it returns, using only
what a client can hold.

Lu et al. (2023) recompute every pipeline stage on a redundant copy — 100 % detection for 100 % extra
compute. This defense spot-checks instead, and never reads the live server: its verifier holds

* a *replica* of the trunk built from public knowledge (the public base weights and the public split and
  adapter configuration; in-process, a copy of the trunk taken at install, before training, which holds
  exactly that), whose frozen weights it hashes at install and checks again before every full audit;
* the *commitment* the server publishes with every hidden-state reply (``ActivationMsg.commitment``: sha256
  of its frozen-weight digest and the bytes of its trainable state of that step, see ``suite.engine.commitment``);
* for an audited step, the *revealed* trainable state (``Server.reveal``: safetensors bytes). The verifier
  hashes the revealed state with its replica's frozen digest and compares the result with the commitment
  before it loads the state into the replica and re-executes. A reveal must name exactly the replica's
  trainable tensors (this client's adapter set under ``per_client``): a frozen base weight, another client's
  adapter or a missing tensor flags the step, so a server cannot slip changed public weights in as "state".
  A reply without a commitment is flagged on every step, whatever ``spot_tokens`` and ``audit_rate``.

Which steps and positions are audited is drawn from the operating system's CSPRNG (``secrets``) after the
server has replied, so a server that knows the policy (its public parameters) cannot predict which steps are
safe to tamper with. The full-audit decision, and the reveal request it makes, come only once the server has
sent *both* replies of the step (hidden states and head gradient): a reveal request before the gradient
would tell the server which steps to compute the gradient honestly on. The detectors:

1. Randomised recomputation on the replica.
   * Every step, a *spot check* when the hidden states arrive: recompute the trunk on the first
     1..``spot_tokens`` positions of one random real sequence (under causal attention those outputs depend
     on that prefix only). It asks for a reveal on every step, so it says nothing of the full-audit schedule.
   * With probability ``audit_rate``, drawn when the head gradient has arrived, a *full audit*: recompute the
     hidden states of the whole batch and the gradient for the head (forward + backward of the replica with
     the committed state and the gradient the tail sent), and compare both.
2. A structural invariant, free: an honest head gradient is exactly zero at a sequence's last real position
   and at padding (the causal-LM loss never uses those outputs).
3. Statistical monitoring (in the spirit of SENTINEL): the cosine of the returned head gradient to the tail
   gradient; below ``min_cosine``, or a robust z-score above ``z_threshold`` after ``warmup`` steps, flags.

What an adaptive server can still do: tamper only positions past the
spot-checked prefix, and gradients in ways that keep the invariant and the cosine; it is then caught by the
full audit only, i.e. with probability ``audit_rate`` per tampered step, and tampering below ``rtol`` of the
tensor's scale is not caught at all (nor does it change much). The commitment covers the state a step was
computed with, not whether the server's optimiser step was honest.
A flagged step is rejected (the client skips its update) and training continues.
"""

from __future__ import annotations

import copy
import math
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from suite.engine.commitment import commit, decode_reveal, for_adapter, frozen_digest, state_names
from suite.engine.parties import Batch, StepRejected
from suite.engine.split import position_ids_for
from suite.errors import ProtocolError
from suite.interfaces.defense import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class IntegrityAuditConfig(DefenseConfig):
    audit_rate: float = 0.05  # probability of a full recomputation per step
    spot_tokens: int = 2  # positions of one sequence recomputed every step
    z_threshold: float = 6.0
    min_cosine: float = 0.1  # an honest head gradient points along the tail gradient (residual blocks)
    warmup: int = 5  # honest steps before the statistics may flag
    rtol: float = 1e-3  # recomputation tolerance, relative to the tensor's scale

    def __post_init__(self) -> None:
        for name in ("spot_tokens", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("audit_rate", "z_threshold", "min_cosine", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number (inf or nan turns a detector off), got {value!r}")
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
    revealed: bool = False  # the replica holds the committed state of the current step
    hidden: torch.Tensor | None = None  # the hidden states the server sent this step (for the full audit)
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
        self.rng = secrets.SystemRandom()  # the audit schedule: unpredictable to the server, never from the config
        self.replica: torch.nn.Module | None = None
        self._replica_frozen: bytes = b""
        self._state_names: set[str] = set()  # what a reveal carries (before filtering to a client's adapter set)
        self._adapters: dict[int, str] = {}  # client id -> its own adapter set (per_client), else empty
        self._reveal: Callable[[int, int], bytes] | None = None
        self.reveals = 0
        self.flags: list[dict] = []  # {"client", "step", "detector", "what"}
        self.served_units = 0.0  # token-passes the server computed (forward = 1, backward = 2)
        self.recomputed_units = 0.0
        self.audit_seconds = 0.0
        self.audited: list[tuple[int, int]] = []  # (client, step) of every full audit, in order

    # --- verifier ----------------------------------------------------------------------------------

    def _flag(self, client, step: int, detector: str, what: str) -> None:
        self.flags.append({"client": client.id, "step": step, "detector": detector, "what": what})
        raise StepRejected(f"{detector} flagged the {what} of step {step}")

    def _load_committed(self, client, step: int) -> None:
        """Ask for the state committed to in this step's reply, check it against the commitment, load it into
        the replica. A missing commitment, an unavailable state, a state that does not hash to the commitment,
        or one whose names are not exactly the replica's trainable state for this client's adapter set (a
        frozen base weight, another client's adapter, a missing tensor) flags the step."""
        commitment = client.received_commitment
        if commitment is None:
            self._flag(client, step, "commitment", "hidden states (no commitment sent)")
        try:
            state, adapter = decode_reveal(self._reveal(client.id, step))
        except ProtocolError:
            self._flag(client, step, "commitment", "hidden states (state not revealed)")
        self.reveals += 1
        if commit(self._replica_frozen, state, adapter) != commitment:
            self._flag(client, step, "commitment", "hidden states (revealed state does not match the commitment)")
        expected = self._adapters.get(client.id)
        if adapter != expected:
            self._flag(client, step, "commitment", f"hidden states (revealed adapter set {adapter!r}, "
                                                   f"this client's is {expected!r})")
        if set(state) != for_adapter(self._state_names, expected):
            self._flag(client, step, "commitment", "hidden states (revealed tensors are not exactly the trainable "
                                                   "state: a frozen weight, another adapter, or one missing)")
        replica = self.replica
        own = dict(replica.named_parameters())
        if adapter is not None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in replica.modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_adapter(adapter)
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    self._flag(client, step, "commitment", "hidden states (revealed tensor of the wrong shape)")
                own[name].copy_(value)

    def _check_frozen(self, client, step: int) -> None:
        """The replica's frozen weights are still the public ones hashed at install (before a full audit:
        nothing but ``_load_committed`` writes the replica, and it writes trainable state only)."""
        if frozen_digest(self.replica) != self._replica_frozen:
            self._flag(client, step, "commitment", "hidden states (the replica's frozen weights changed)")

    def _check_hidden(self, client, state: _ClientState, step: int, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        start = time.perf_counter()
        sent, mask = client.sent_activation, batch.attention_mask
        self.served_units += 3 * int(mask.sum())
        state.revealed, state.hidden = False, hidden
        try:
            # A server that agreed to the audit commits to every reply: one without a commitment is flagged
            # whatever the spot check and audit rate (nothing could be checked against it).
            if client.received_commitment is None:
                self._flag(client, step, "commitment", "hidden states (no commitment sent)")
            rows = [i for i in range(mask.shape[0]) if mask[i, 0]]
            spot = bool(self.config.spot_tokens and rows)
            if spot:
                self._load_committed(client, step)
                state.revealed = True
            with torch.no_grad():
                if spot:
                    r = self.rng.choice(rows)
                    length = min(self.rng.randint(1, self.config.spot_tokens), int(mask[r].sum()))
                    m = mask[r : r + 1, :length]
                    want = self.replica(sent[r : r + 1, :length], m, position_ids_for(m))
                    self.recomputed_units += length
                    if not _close(hidden[r : r + 1, :length], want, self.config.rtol):
                        self._flag(client, step, "spot_check", "hidden states")
        finally:
            self.audit_seconds += time.perf_counter() - start
        return hidden

    def _check_gradient(self, client, state: _ClientState, step: int, grad: torch.Tensor,
                        head_out: torch.Tensor, batch: Batch) -> torch.Tensor:
        start = time.perf_counter()
        try:
            mask = batch.attention_mask.bool()
            tail_grad = client.sent_gradient
            # Both replies of the step are in: only now is the full audit drawn (and its reveal requested).
            audit = self.rng.random() < self.config.audit_rate
            if audit:
                self.audited.append((client.id, step))
                if not state.revealed:
                    self._load_committed(client, step)
                    state.revealed = True
                self._check_frozen(client, step)
                with torch.no_grad():
                    want = self.replica(client.sent_activation, batch.attention_mask,
                                        position_ids_for(batch.attention_mask))
                self.recomputed_units += int(mask.sum())
                if state.hidden is None or not _close(state.hidden[mask], want[mask], self.config.rtol):
                    self._flag(client, step, "full_audit", "hidden states")
            if audit and tail_grad is not None:
                want = self._recompute_gradient(head_out, batch, tail_grad)
                self.recomputed_units += 3 * int(mask.sum())
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

    def _recompute_gradient(self, head_out, batch, tail_grad) -> torch.Tensor:
        """The head gradient an honest server would have sent: replica backward with the committed state."""
        x = head_out.detach().clone().requires_grad_(True)
        mask = batch.attention_mask
        out = self.replica(x, mask, position_ids_for(mask))
        (grad,) = torch.autograd.grad(out, x, tail_grad)
        return grad

    # --- wiring ------------------------------------------------------------------------------------

    def install(self, session) -> None:
        server = session.server
        server.commit_state = True  # the protocol this defense runs: commitments on, reveals on request
        # The replica: public base weights and public adapter configuration, before any training (a client
        # builds it the same way from the public model). The reveal request returns bytes, never the
        # server's objects.
        self._attach(session.clients, server.trunk, server.reveal, server.adapters)

    def install_server(self, server) -> None:
        """``splitleak serve``: commit to every step's trunk state; reveals are answered over the link."""
        server.commit_state = True

    def install_client(self, client, remote) -> None:
        """``splitleak client``: the verifier on this client's own replica, built from the trunk the public
        knowledge gives (``remote.public_trunk``), with reveals requested over the link."""
        self._attach([client], remote.public_trunk, remote.reveal, remote.adapters)

    def _attach(self, clients, public_trunk: torch.nn.Module, reveal: Callable[[int, int], bytes],
                adapters: dict[int, str]) -> None:
        # The replica is a copy taken now, before any training; its frozen weights are hashed here once;
        # every trainable value it computes with later comes from a reveal checked against a commitment.
        self.replica = copy.deepcopy(public_trunk)
        self._replica_frozen = frozen_digest(self.replica)
        self._state_names = state_names(self.replica)
        self._adapters = dict(adapters or {})
        self._reveal = reveal
        for client in clients:
            state = _ClientState()

            def hidden_hook(step, hidden, batch, client=client, state=state):
                return self._check_hidden(client, state, step, hidden, batch)

            def gradient_hook(step, grad, head_out, batch, client=client, state=state):
                return self._check_gradient(client, state, step, grad, head_out, batch)

            client.hidden_hooks.append(hidden_hook)
            client.gradient_hooks.append(gradient_hook)

    def flagged_steps(self) -> set[tuple[int, str]]:
        """(step, "hidden" | "gradient") pairs that were rejected."""
        return {(f["step"], "hidden" if f["what"].startswith("hidden") else "gradient") for f in self.flags}

    def report(self) -> dict:
        by = {}
        for f in self.flags:
            by[f["detector"]] = by.get(f["detector"], 0) + 1
        return {"audit_rate": self.config.audit_rate, "spot_tokens": self.config.spot_tokens,
                "flagged": len(self.flags), "flagged_by": by, "reveals": self.reveals,
                "verifier": "replica + commitments (no access to the live trunk)",
                "extra_compute": self.recomputed_units / self.served_units if self.served_units else 0.0}
