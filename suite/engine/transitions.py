"""Transitions of a server-side party, and re-executing one on a replica: the pieces of a transition audit.

A party that trains (the server, or one pipeline stage) goes from state s_t to s_{t+1} in one forward /
backward pair: its trainable weights and its optimiser's state (AdamW's moments and step count) change by
what the step's inputs (the activations it received, the gradients sent back to it) make of them. A party
that computes honestly with weights it trained toward its own goal passes every check of its *outputs*
against its committed weights (``defenses/integrity_audit.py``: the outside read of issue 27); what it cannot
pass is a check of the *transition*: s_{t+1} (and the step's outputs) must be what an honest step computes
from s_t and the step's inputs.

* ``TransitionRecorder`` wraps one ``Server`` (wrap, don't replace): for every forward / backward pair it keeps
  the state before, the messages the party received (as bytes), the messages it sent (as bytes) and the
  state after, with the digest of the state after (its commitment).
* ``Replica`` is the verifier's own copy of the party's modules, built from the party's public build
  (``PublicParty``: public frozen weights, public adapter configuration, the public initial state, taken by
  the orchestrator when it built the parties: no access to the live party). ``replay`` loads a committed
  state, feeds it the recorded messages and returns what an honest step makes of them: its state after and
  its messages out.
* a snapshot covers the whole state: trainable weights, optimiser states, and the digest of the fixed part
  (frozen weights, buffers, plain module settings such as LoRA ``scaling``), so nothing a party can change
  between steps is outside its commitment.
* chaining: a transition's ``before`` is what the party reports; the audit must also check that its digest is
  the previous transition's ``commitment`` (``defenses/transition_audit.py`` does, on every transition),
  or a party that changes its weights between steps and then computes honestly would replay clean.

Who may hold the inputs: they are exactly what the audited party received in that step; under
``batch_parallel`` that includes every client's activations of the pass (stage 0) or their hidden states at
the stage's depth. The verifier is therefore a server-side party that may see that much (a standby or
replica stage operator), not a client, which would learn the other clients' activations.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from suite.engine.commitment import state_names, trainable_state
from suite.engine.parties import Server, UpdateRefused
from suite.engine.protocol import ActivationMsg, GradientMsg, encode
from suite.engine.transport import InProcessTransport


@dataclass
class Snapshot:
    """A party's whole state: its trainable weights and optimiser states (by adapter set), what a transition
    changes, and ``fixed``, the digest of what no transition may change (its frozen weights, its buffers and
    its modules' plain settings: LoRA ``scaling`` and rank, norm epsilons; see ``settings`` and
    ``PublicFixed``)."""

    weights: dict[str, torch.Tensor]
    optimizers: dict[str | None, dict | None]
    fixed: bytes = b""

    def digest(self) -> bytes:
        """sha256 of every tensor and number of the snapshot: the party's commitment to it."""
        h = hashlib.sha256(b"splitleak-transition-v2" + self.fixed)

        def add(name: str, value) -> None:
            if isinstance(value, torch.Tensor):
                t = value.detach().to("cpu").contiguous().reshape(-1)
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            elif isinstance(value, dict):
                for k in sorted(value, key=str):
                    add(f"{name}.{k}", value[k])
            elif isinstance(value, list | tuple):
                for i, v in enumerate(value):
                    add(f"{name}.{i}", v)
            else:
                h.update(f"{name}={value!r}|".encode())

        add("weights", self.weights)
        add("optimizers", {str(k): v for k, v in self.optimizers.items()})
        return h.digest()


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype})
_NOT_PLAIN = object()


def _plain(value):
    """A plain setting (numbers, strings, and containers of them) in a canonical form (sets and dicts
    sorted), or ``_NOT_PLAIN`` for anything else (tensors and modules are covered as weights; callables and
    objects are not settings)."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is list or kind is tuple:
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else (kind.__name__, *items)
    if kind is set or kind is frozenset:
        items = sorted((_plain(v) for v in value), key=repr)
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else ("set", *items)
    if kind is dict:
        items = sorted(((_plain(k), _plain(v)) for k, v in value.items()), key=repr)
        return _NOT_PLAIN if any(k is _NOT_PLAIN or v is _NOT_PLAIN for k, v in items) else ("dict", *items)
    return _NOT_PLAIN


# not settings: the mode and the active adapter (see ``settings``), and the module's own tensors and
# submodules, which the weights and the named modules cover
_NOT_SETTINGS = frozenset({"training", "_active_adapter", "active_adapter", "_parameters", "_buffers", "_modules"})


def settings(trunk: nn.Module) -> dict[str, str]:
    """Every module's plain attributes (LoRA ``scaling`` / ``r`` / ``lora_alpha``, norm epsilons, attention
    scaling...), one text per module: what changes the computation without being a tensor. Left out:
    ``training`` (train / eval mode: the harness switches it, and with no dropout in the trunk it changes
    nothing that is computed) and the active adapter (``per_client``: every pass activates its client's own
    set, so which one was active before a pass changes nothing it computes)."""
    out = {}
    for mname, module in trunk.named_modules():
        plain = []
        for key, value in vars(module).items():
            if key not in _NOT_SETTINGS and (v := _plain(value)) is not _NOT_PLAIN:
                plain.append((key, v))
        out[mname] = repr(sorted(plain, key=lambda kv: kv[0]))
    return out


def _fixed_tensors(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights and the buffers: every tensor ``trainable_state`` does not cover."""
    names = state_names(trunk)
    out = {f"param:{n}": p for n, p in trunk.named_parameters() if n not in names}
    out.update({f"buffer:{n}": b for n, b in trunk.named_buffers()})
    return out


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256(b"splitleak-fixed-v1")
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _with_settings(tensors_digest: bytes, plain: dict[str, str]) -> bytes:
    h = hashlib.sha256(tensors_digest)
    for name in sorted(plain):
        h.update(f"{name}={plain[name]}|".encode())
    return h.digest()


class PublicFixed:
    """The public fixed part of one party (its frozen weights and buffers), from its public build, and a
    cheap digest of a live trunk's fixed part: ``digest_of`` compares the live frozen tensors with the public
    ones on their device (no hashing) and uses the public tensors' digest, computed once, when every one is
    equal, else hashes what the trunk holds; the trunk's plain settings (``settings``) are hashed every time
    (they are small). A frozen weight scaled between steps, or a LoRA ``scaling`` changed, gives another
    digest at the party's next snapshot."""

    def __init__(self, trunk: nn.Module):
        self.tensors = {n: t.detach() for n, t in _fixed_tensors(trunk).items()}  # never written
        self.tensors_digest = _tensors_digest(self.tensors)

    def _matches(self, tensors: dict[str, torch.Tensor]) -> bool:
        if tensors.keys() != self.tensors.keys():
            return False
        for name, t in tensors.items():
            ref = self.tensors[name]
            if t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device:
                return False
            if not torch.equal(t.detach(), ref):  # NaN is never equal: a NaN weight is a difference
                return False
        return True

    def digest_of(self, trunk: nn.Module) -> bytes:
        tensors = _fixed_tensors(trunk)
        part = self.tensors_digest if self._matches(tensors) else _tensors_digest(tensors)
        return _with_settings(part, settings(trunk))


def snapshot(server: Server, public: PublicFixed | None = None) -> Snapshot:
    """``server``'s state; ``public``: the party's public fixed part, against which its own is checked (None:
    its fixed part is hashed in full)."""
    fixed = (public.digest_of(server.trunk) if public is not None
             else _with_settings(_tensors_digest(_fixed_tensors(server.trunk)), settings(server.trunk)))
    return Snapshot(trainable_state(server.trunk),
                    {k: copy.deepcopy(o.state_dict()) if o is not None else None for k, o in server.optimizers.items()},
                    fixed)


def restore(server: Server, snap: Snapshot) -> None:
    """Load ``snap`` into ``server`` (its weights in place, its optimisers' states)."""
    params = dict(server.trunk.named_parameters())
    with torch.no_grad():
        for name, value in snap.weights.items():
            params[name].copy_(value)
    for k, opt in server.optimizers.items():
        if opt is not None and snap.optimizers.get(k) is not None:
            opt.load_state_dict(copy.deepcopy(snap.optimizers[k]))


def _largest(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two tensors of one shape; NaN where either holds a NaN the other
    does not hold at the same place (a NaN is a difference, never dropped)."""
    if not a.numel():
        return 0.0
    a, b = a.detach().float(), b.to(a.device).detach().float()
    both = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both, torch.zeros_like(a), (a - b).abs())
    return float("nan") if bool(torch.isnan(d).any()) else float(d.max())


def worst(values) -> float:
    """max() that keeps NaN (Python's max drops it when it is not first): NaN if any value is NaN."""
    out = 0.0
    for v in values:
        if v != v:
            return float("nan")
        out = max(out, v)
    return out


def within(value: float, tolerance: float) -> bool:
    """A difference accepted: not NaN, and at most ``tolerance``."""
    return value == value and value <= tolerance


def difference(a: Snapshot, b: Snapshot) -> float:
    """The largest absolute difference between two snapshots' tensors (inf when their structure or their
    fixed part differs, NaN when a NaN stands where the other holds a number)."""
    if set(a.weights) != set(b.weights) or set(a.optimizers) != set(b.optimizers) or a.fixed != b.fixed:
        return float("inf")
    if any(a.weights[k].shape != b.weights[k].shape for k in a.weights):
        return float("inf")
    worst_ = worst(_largest(a.weights[k], b.weights[k]) for k in a.weights)
    for k, sa in a.optimizers.items():
        sb = b.optimizers[k]
        if (sa is None) != (sb is None):
            return float("inf")
        if sa is None:
            continue
        if set(sa["state"]) != set(sb["state"]) or sa.get("param_groups") != sb.get("param_groups"):
            return float("inf")
        for i, st in sa["state"].items():
            for name, v in st.items():
                w = sb["state"][i].get(name)
                if not isinstance(v, torch.Tensor) or not isinstance(w, torch.Tensor) or v.shape != w.shape:
                    return float("inf")
                worst_ = worst((worst_, _largest(v, w)))
            if set(st) != set(sb["state"][i]):
                return float("inf")
    return worst_


@dataclass
class Transition:
    """One forward / backward pair of a party: its state before and after, and the messages in and out
    (``(src, dst, message)`` in order; a message is encoded to the bytes it crossed as only for a replay)."""

    index: int
    client_ids: list[int]
    steps: dict[int, int]
    skip: dict[int, str]
    updates: bool
    before: Snapshot
    received: list[tuple[str, str, ActivationMsg | GradientMsg]] = field(default_factory=list)
    sent: list[tuple[str, str, ActivationMsg | GradientMsg]] = field(default_factory=list)
    after: Snapshot | None = None
    commitment: bytes | None = None


class TransitionRecorder:
    """Records every transition of ``server`` and hands each, once its backward is done, to ``on_transition``.
    Installs itself by wrapping the party's ``forward``, ``backward`` and ``_send`` and tapping its inbox.

    ``updates``: whether the pass is a training pass, asked of the orchestrator (the step's caller, e.g.
    ``Session.updates``) at the pass's start, never of the party (its own ``updates`` flag is its word, and a
    party that declares a training pass update-free would pick which passes are audited). ``public``: the
    party's public fixed part, against which every snapshot's is checked."""

    def __init__(self, server: Server, on_transition: Callable[[Transition], None],
                 updates: Callable[[], bool] | None = None, public: PublicFixed | None = None, start: int = 0):
        self.server = server
        self.on_transition = on_transition
        self.updates = updates if updates is not None else (lambda: True)
        self.public = public
        self.count = start  # the index of the next transition
        self._current: Transition | None = None
        self._forward, self._backward, self._send = server.forward, server.backward, server._send
        server.forward, server.backward, server._send = self.forward, self.backward, self.send
        server.inbox_taps.append(self._received)

    def _received(self, msg: ActivationMsg | GradientMsg) -> None:
        if self._current is None:
            return
        src_stage = self.server.down if isinstance(msg, GradientMsg) else self.server.up
        me, peer = self.server._link(msg.client_id, src_stage)
        self._current.received.append((peer, me, msg))  # decoded from the bytes it came as: never changed

    def send(self, client_id: int, stage: str | None, msg: ActivationMsg | GradientMsg) -> None:
        if self._current is not None:
            me, peer = self.server._link(client_id, stage)
            self._current.sent.append((me, peer, _detached(msg)))
        self._send(client_id, stage, msg)

    def forward(self, client_ids, step) -> None:
        ids = list(client_ids)
        steps = {c: step[c] for c in ids} if isinstance(step, dict) else dict.fromkeys(ids, step)
        self._current = Transition(self.count, ids, steps, {}, bool(self.updates()),
                                   snapshot(self.server, self.public))
        self._forward(client_ids, step)

    def backward(self, step: int | None = None, skip=None) -> None:
        current = self._current
        if current is not None:
            current.skip = dict(skip or {})
        try:
            self._backward(step, skip=skip)
        finally:
            if current is not None:
                self._current = None
                current.after = snapshot(self.server, self.public)
                current.commitment = current.after.digest()
                self.count += 1
                self.on_transition(current)


@dataclass
class PublicParty:
    """What anyone may rebuild of one server-side party from the public configuration: its trunk as built
    (public base weights, LoRA A drawn from the run's public seed, LoRA B zero), its adapter sets, learning
    rate and wiring. The orchestrator takes it when it builds the parties, before any party runs code
    (``suite.engine.training.build_session(keep_public=True)``); nothing here is the live party's."""

    trunk: nn.Module
    adapters: dict[int, str]
    lr: float
    name: str
    up: str | None
    down: str | None

    @classmethod
    def of(cls, server: Server, lr: float) -> PublicParty:
        return cls(copy.deepcopy(server.trunk), dict(server.adapters), lr, server.name, server.up, server.down)

    def build(self, transport, own: bool = True) -> Server:
        """A fresh party from the public build, with fresh optimisers; ``own``: on its own copy of the trunk
        (False: on this trunk itself, for the one replica, which writes only trainable state to it: its
        fixed part stays the public one, and a later ``build`` overwrites the trainable state it copies)."""
        trunk = copy.deepcopy(self.trunk) if own else self.trunk
        return Server(trunk, transport, self.lr, adapters=dict(self.adapters) or None,
                      device=_device(self.trunk), name=self.name, up=self.up, down=self.down)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


class Replica:
    """The verifier's copy of one party, built from its public build (``PublicParty``: public frozen weights,
    public adapter configuration, the public initial state); never the live party's objects. Its trunk's
    fixed part is never written (a replay restores trainable state only), so it is also the public reference
    of the party's fixed part (``public``)."""

    def __init__(self, public: PublicParty):
        self.server = public.build(InProcessTransport(), own=False)  # no second copy of the trunk
        self.public = PublicFixed(self.server.trunk)
        self.initial = snapshot(self.server, self.public)  # the state the party's first transition starts from
        self._done: list[Transition] = []
        # records what it sends as the party's recorder does; whether it steps is set per replay
        self._updates = True
        TransitionRecorder(self.server, self._done.append, lambda: self._updates, self.public)

    def replay(self, t: Transition) -> Transition:
        """What an honest step computes from ``t.before`` and ``t.received`` (its ``after`` and ``sent``);
        ``t.updates`` (the orchestrator's word) says whether it steps."""
        s = self.server
        s.transport = transport = InProcessTransport()
        restore(s, t.before)
        s.updates = self._updates = t.updates
        for src, dst, msg in t.received:
            transport.send(src, dst, encode(msg))
        self._done.clear()
        s.forward(t.client_ids, t.steps)
        try:
            s.backward(skip=t.skip)
        except UpdateRefused:
            pass
        return self._done[-1]


def become_standby(party: Server, public: PublicParty, state: Snapshot) -> None:
    """Turn the excluded ``party`` object into a standby: a fresh party from the public build with
    ``state``'s trainable weights and optimiser states, on the same transport and links. Every attribute of
    the excluded object goes (its trunk with whatever it did to its frozen weights or settings, its policy,
    any method it replaced; a subclass's class too); the object stays, so whoever holds it (the step
    functions, a stage chain, the session) now talks to the standby. Its inbox taps (observers) are kept,
    but not a transition recorder's: whoever audits the standby records it anew."""
    fresh = public.build(party.transport)
    restore(fresh, state)
    fresh.bounds = party.bounds
    fresh.inbox_taps = [tap for tap in party.inbox_taps
                        if not isinstance(getattr(tap, "__self__", None), TransitionRecorder)]
    fresh.optimizer_steps = dict(party.optimizer_steps)  # the seat's training budget, spent so far
    party.__class__ = Server
    party.__dict__.clear()
    party.__dict__.update(fresh.__dict__)


def _detached(msg: ActivationMsg | GradientMsg) -> ActivationMsg | GradientMsg:
    field_name = "hidden" if isinstance(msg, ActivationMsg) else "grad"
    return dataclasses.replace(msg, **{field_name: getattr(msg, field_name).detach()})


def messages_differ(a: list[tuple[str, str, ActivationMsg | GradientMsg]],
                    b: list[tuple[str, str, ActivationMsg | GradientMsg]]) -> float:
    """The largest absolute difference between two runs' messages out (inf when they are not the same
    messages: count, endpoints, kind, client, step or shape)."""
    if len(a) != len(b):
        return float("inf")
    worst_ = 0.0
    for (sa, da, ma), (sb, db, mb) in zip(a, b, strict=True):
        if (sa, da) != (sb, db):
            return float("inf")
        if type(ma) is not type(mb) or ma.client_id != mb.client_id or ma.step != mb.step:
            return float("inf")
        ta = ma.hidden if isinstance(ma, ActivationMsg) else ma.grad
        tb = mb.hidden if isinstance(mb, ActivationMsg) else mb.grad
        if ta.shape != tb.shape:
            return float("inf")
        worst_ = worst((worst_, _largest(ta, tb)))
    return worst_
