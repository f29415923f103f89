"""Transitions of a server-side party, and re-executing one on a replica: the pieces of a transition audit.

A party that trains (the server, or one pipeline stage) goes from state s_t to s_{t+1} in one forward /
backward pair: its trainable weights and its optimiser's state (AdamW's moments and step count) change by
what the step's inputs (the activations it received, the gradients sent back to it) make of them. A party
that computes honestly with weights it trained toward its own goal passes every check of its *outputs*
against its committed weights (``defenses/integrity_audit.py``: an outside review found this); what it cannot
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
import hashlib
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from suite.engine.commitment import state_names, trainable_state
from suite.engine.parties import Server, UpdateRefused
from suite.engine.protocol import ActivationMsg, GradientMsg, decode, peek
from suite.engine.transport import SERVER, Frame, InProcessTransport, Transport, client_endpoint


@dataclass
class Snapshot:
    """A party's whole state: its trainable weights and optimiser states (by adapter set), what a transition
    changes, and ``fixed``, the digest of what no transition may change (its frozen weights, its buffers and
    its modules' plain settings: LoRA ``scaling`` and rank, norm epsilons; see ``settings`` and
    ``PublicFixed``)."""

    weights: dict[str, torch.Tensor]
    optimizers: dict[str | None, dict | None]
    fixed: bytes = b""
    _digest: bytes | None = field(default=None, repr=False, compare=False)  # a snapshot is never written

    def digest(self, cached: bool = True) -> bytes:
        """sha256 of every tensor and number of the snapshot: the party's commitment to it (``cached``: the
        one computed first; False: computed anew, for a record that may have been written since)."""
        if cached and self._digest is not None:
            return self._digest
        self._digest = self._compute()
        return self._digest

    def _compute(self) -> bytes:
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


def _settings_raw(trunk: nn.Module) -> list:
    """Every module's plain attributes, canonical but not yet text (compared with ``==``, cheaply)."""
    out = []
    for mname, module in trunk.named_modules():
        plain = []
        for key, value in vars(module).items():
            if key not in _NOT_SETTINGS and (v := _plain(value)) is not _NOT_PLAIN:
                plain.append((key, v))
        out.append((mname, plain))
    return out


def _settings_text(plain: list) -> str:
    """One module's plain attributes from ``_settings_raw`` as the text ``settings`` gives."""
    return repr(sorted(plain, key=lambda kv: kv[0]))


def settings(trunk: nn.Module) -> dict[str, str]:
    """Every module's plain attributes (LoRA ``scaling`` / ``r`` / ``lora_alpha``, norm epsilons, attention
    scaling...), one text per module: what changes the computation without being a tensor. Left out:
    ``training`` (train / eval mode: the harness switches it, and with no dropout in the trunk it changes
    nothing that is computed) and the active adapter (``per_client``: every pass activates its client's own
    set, so which one was active before a pass changes nothing it computes)."""
    return {mname: _settings_text(plain) for mname, plain in _settings_raw(trunk)}


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


_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})


def _quick_look(modules: list[tuple[str, nn.Module]], keys: list | None) -> list | None:
    """What ``PublicFixed._settings_of`` compares between two reads: per module (name, object, its attribute
    names, its plain attributes' values copied and their types); None when the modules are not those of
    ``keys``."""
    if keys is None or len(modules) != len(keys):
        return None
    out = []
    for (name, module), (kname, kmodule, plain) in zip(modules, keys, strict=True):
        if name != kname or module is not kmodule:
            return None
        d = vars(module)
        values = tuple(_plain(v) if type(v := d.get(k)) in _CONTAINERS else v for k in plain)
        out.append((frozenset(d), values, tuple(map(type, values))))
    return out


@dataclass
class _Look:
    """What ``PublicFixed`` last saw of one trunk."""

    trunk: weakref.ref
    # the live tensors last found equal to the public ones: (object, storage address, version) by name
    seen: dict[str, tuple[int, int, int]] | None = None
    turn: int = 0  # which share of the frozen tensors the next full look compares by value
    settings: tuple[list, dict[str, str]] | None = None  # the last settings read, and their text
    quick_keys: list | None = None
    quick: list | None = None


class PublicFixed:
    """The public fixed part of one party (its frozen weights and buffers), from its public build, and a
    cheap digest of a live trunk's fixed part: ``digest_of`` compares the live frozen tensors with the public
    ones on their device (no hashing; by version when unchanged since, see there) and uses the public
    tensors' digest, computed once, when every one is equal, else hashes what the trunk holds; the trunk's
    plain settings (``settings``) are re-read in full when a quick look finds one changed. A frozen weight
    scaled between steps, or a LoRA ``scaling`` changed, gives another digest at the party's next snapshot."""

    ROTATION = 4  # a full look compares 1 / ROTATION of the frozen tensors by value (see ``digest_of``)

    def __init__(self, trunk: nn.Module):
        self.tensors = {n: t.detach() for n, t in _fixed_tensors(trunk).items()}  # never written
        self.tensors_digest = _tensors_digest(self.tensors)
        self._looks: dict[int, _Look] = {}  # what was last seen of each trunk looked at (the party's, the replica's)

    def _look(self, trunk: nn.Module) -> _Look:
        look = self._looks.get(id(trunk))
        if look is None or look.trunk() is not trunk:
            look = self._looks[id(trunk)] = _Look(weakref.ref(trunk))
        return look

    @staticmethod
    def _tokens(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, int]]:
        return {n: (id(t), t.data_ptr(), t._version) for n, t in tensors.items()}

    def _settings_of(self, trunk: nn.Module) -> dict[str, str]:
        """``settings(trunk)``, re-read in full only when a quick look finds something changed: the same
        modules, each with the same attribute names, its plain attributes holding equal values of the same
        types (containers compared by value against a copy)."""
        look = self._look(trunk)
        modules = list(trunk.named_modules())
        if look.settings is not None and look.quick == _quick_look(modules, look.quick_keys):
            return look.settings[1]
        raw = _settings_raw(trunk)
        if look.settings is None or look.settings[0] != raw:
            look.settings = (raw, {m: _settings_text(p) for m, p in raw})
        look.quick_keys = [(name, module, tuple(k for k, _ in plain))
                           for (name, module), (_, plain) in zip(modules, raw, strict=True)]
        look.quick = _quick_look(modules, look.quick_keys)
        return look.settings[1]

    def _matches(self, tensors: dict[str, torch.Tensor], every: bool = True) -> bool:
        """Whether ``tensors`` equal the public ones (``every``: and are all of them)."""
        if every and tensors.keys() != self.tensors.keys():
            return False
        for name, t in tensors.items():
            ref = self.tensors[name]
            if t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device:
                return False
            if not torch.equal(t.detach(), ref):  # NaN is never equal: a NaN weight is a difference
                return False
        return True

    def digest_of(self, trunk: nn.Module, full: bool = True) -> bytes:
        """The digest of ``trunk``'s fixed part. A frozen tensor that is the same object at the same address
        with the same version as when last found equal to the public one is taken as equal: an in-place write
        through autograd (``torch.no_grad(): p.mul_``) bumps the version, a swapped tensor changes the object
        or its address. A write around the version counter (``p.data.mul_``, through numpy) does neither:
        ``full`` (the after-state of every transition) also compares a rotating 1 / ``ROTATION`` of the
        tensors by value, so a lasting one is found within ``ROTATION`` transitions at any rate (one undone
        before the next after-state is a tampered step, found by the replay at ``rate``). Any difference:
        every tensor is compared, and hashed when one differs."""
        tensors = _fixed_tensors(trunk)
        look = self._look(trunk)
        same = look.seen is not None and self._tokens(tensors) == look.seen
        if same and full:
            names = sorted(tensors)[look.turn % self.ROTATION::self.ROTATION]
            look.turn += 1
            same = self._matches({n: tensors[n] for n in names}, every=False)
        if same:
            part = self.tensors_digest
        elif self._matches(tensors):
            part, look.seen = self.tensors_digest, self._tokens(tensors)
        else:
            part, look.seen = _tensors_digest(tensors), None
        return _with_settings(part, self._settings_of(trunk))


def _optimizer_copy(state: dict) -> dict:
    """A copy of an optimiser's ``state_dict()``: its tensors cloned, the rest (numbers, groups) deep-copied."""
    return {k: ({i: {n: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                     for n, v in st.items()} for i, st in v.items()} if k == "state" else copy.deepcopy(v))
            for k, v in state.items()}


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a.detach(), b)


def _holds(server: Server, snap: Snapshot) -> bool:
    """Whether ``server`` holds exactly ``snap``'s trainable weights and optimiser states (compared by value:
    NaN is never equal, so a state with a NaN is snapshotted anew)."""
    params = {n: p for n, p in server.trunk.named_parameters() if n in snap.weights}
    if params.keys() != snap.weights.keys() or state_names(server.trunk) != params.keys():
        return False
    if not all(_equal(p, snap.weights[n]) for n, p in params.items()):
        return False
    if server.optimizers.keys() != snap.optimizers.keys():
        return False
    for k, opt in server.optimizers.items():
        kept = snap.optimizers[k]
        if (opt is None) != (kept is None):
            return False
        if opt is None:
            continue
        live = opt.state_dict()
        if live.keys() != kept.keys() or live["param_groups"] != kept["param_groups"]:
            return False
        if live["state"].keys() != kept["state"].keys():
            return False
        for i, st in live["state"].items():
            other = kept["state"][i]
            if st.keys() != other.keys():
                return False
            for n, v in st.items():
                w = other[n]
                if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor):
                    return False
                if not (_equal(v, w) if isinstance(v, torch.Tensor) else v == w):
                    return False
    return True


def snapshot(server: Server, public: PublicFixed | None = None, previous: Snapshot | None = None,
             full: bool = True) -> Snapshot:
    """``server``'s state; ``public``: the party's public fixed part, against which its own is checked (None:
    its fixed part is hashed in full). ``previous``: a snapshot the party may still hold (its last
    after-state), returned itself when the party holds exactly its weights, optimiser states and fixed part
    (no copy, its digest already known). ``full``: the fixed part compared in full (see
    ``PublicFixed.digest_of``)."""
    fixed = (public.digest_of(server.trunk, full=full) if public is not None
             else _with_settings(_tensors_digest(_fixed_tensors(server.trunk)), settings(server.trunk)))
    if previous is not None and previous.fixed == fixed and _holds(server, previous):
        return previous
    return Snapshot(trainable_state(server.trunk),
                    {k: _optimizer_copy(o.state_dict()) if o is not None else None
                     for k, o in server.optimizers.items()},
                    fixed)


def restore(server: Server, snap: Snapshot) -> None:
    """Load ``snap`` into ``server`` (its weights in place, its optimisers' states)."""
    params = dict(server.trunk.named_parameters())
    with torch.no_grad():
        for name, value in snap.weights.items():
            params[name].copy_(value)
    for k, opt in server.optimizers.items():
        if opt is not None and snap.optimizers.get(k) is not None:
            opt.load_state_dict(_optimizer_copy(snap.optimizers[k]))


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
    (``(src, dst, bytes)`` in order, as they crossed the orchestrator's link: what the party's peers sent it
    and what its peers got from it, never the party's own decoded objects)."""

    index: int
    client_ids: list[int]
    steps: dict[int, int]
    skip: dict[int, str]
    updates: bool
    before: Snapshot
    received: list[tuple[str, str, bytes]] = field(default_factory=list)
    sent: list[tuple[str, str, bytes]] = field(default_factory=list)
    after: Snapshot | None = None
    commitment: bytes | None = None


def _links(name: str, client_id: int, towards: str | None) -> tuple[str, str]:
    """(the party's endpoint, the peer's) on its link towards ``towards`` (``up`` or ``down``; None: the
    client), from the party's public wiring (never the party's own ``_link``)."""
    return (SERVER, client_endpoint(client_id)) if towards is None else (name, towards)


class TransitionRecorder:
    """Records every transition of ``server`` and hands each, once its backward is done, to ``on_transition``.
    Installs itself by wrapping the party's ``forward`` and ``backward``, and a tap on ``link``: the
    orchestrator's transport between the parties (the session's), not the party's ``transport`` attribute.

    What the party received is what its peers put on ``link`` for it (the bytes, kept as they crossed: an
    inbox tap or a transport of the party's own that edits them changes nothing recorded); what it sent is
    what ``link`` carried from it while its forward or backward ran (a transport of its own that edits its
    replies after computing them is caught: the replay's replies are compared with what the peers got).

    ``updates``: whether the pass is a training pass, asked of the orchestrator (the step's caller, e.g.
    ``Session.updates``) at the pass's start, never of the party (its own ``updates`` flag is its word, and a
    party that declares a training pass update-free would pick which passes are audited). ``public``: the
    party's public fixed part, against which every snapshot's is checked. ``wiring``: (name, up, down) of the
    party's public build (None: the party's own, for a replica)."""

    def __init__(self, server: Server, on_transition: Callable[[Transition], None],
                 updates: Callable[[], bool] | None = None, public: PublicFixed | None = None, start: int = 0,
                 link: Transport | None = None, wiring: tuple[str, str | None, str | None] | None = None):
        self.server = server
        self.on_transition = on_transition
        self.updates = updates if updates is not None else (lambda: True)
        self.public = public
        self.count = start  # the index of the next transition
        self.wiring = wiring if wiring is not None else (server.name, server.up, server.down)
        name, up, down = self.wiring
        self.endpoints = {SERVER if up is None else name, SERVER if down is None else name}
        self._current: Transition | None = None
        self._last: Snapshot | None = None  # the last after-state: the next before-state, if the party holds it
        self.given_before: Snapshot | None = None  # a replica's: the state it was just restored to
        self.full_after = True  # compare a share of the frozen tensors by value at every after-state
        self.seconds_party = 0.0  # time in the party's own forward and backward
        self.seconds_recording = 0.0  # time taking snapshots and commitments
        self._active = False  # the party's forward or backward is running: what it sends on the link is its own
        self._inbox: dict[tuple[str, str, str], deque[bytes]] = defaultdict(deque)  # delivered, not yet consumed
        self.link: Transport | None = None
        self.attach(link if link is not None else server.transport)
        self._forward, self._backward = server.forward, server.backward
        server.forward, server.backward = self.forward, self.backward

    def attach(self, link: Transport) -> None:
        """Record the party on ``link`` (from now on; what was delivered on an earlier link is dropped)."""
        if self.link is not None:
            self.link.remove_tap(self._frame)
        self.link = link
        self._inbox.clear()
        link.add_tap(self._frame)

    def detach(self) -> None:
        """Stop recording (the party was replaced: whoever audits the standby records it anew)."""
        if self.link is not None:
            self.link.remove_tap(self._frame)
            self.link = None
        self._inbox.clear()

    def _inbound(self, src: str, dst: str, kind: str) -> bool:
        """Whether the party consumes ``kind`` messages on the link ``src`` -> ``dst``: activations from
        ``up``, gradients from ``down`` (a client on the side that is None)."""
        name, up, down = self.wiring
        peer = up if kind == "activation" else down if kind == "gradient" else name
        if peer is None:
            return src.startswith("client/") and dst == SERVER
        return (src, dst) == (peer, name)

    def _frame(self, frame: Frame) -> None:
        if frame.dst in self.endpoints:
            kind = peek(frame.data)[0]
            if self._inbound(frame.src, frame.dst, kind):
                self._inbox[(frame.src, frame.dst, kind)].append(frame.data)
        if self._active and self._current is not None and frame.src in self.endpoints:
            self._current.sent.append((frame.src, frame.dst, frame.data))

    def _take(self, client_ids, towards: str | None, kind: str) -> None:
        """The messages the link delivered to the party for ``client_ids`` from ``towards``, in order."""
        name = self.wiring[0]
        for c in client_ids:
            me, peer = _links(name, c, towards)
            queue = self._inbox.get((peer, me, kind))
            if queue:  # none: nothing crossed the link for it (the replay then finds no input: a difference)
                self._current.received.append((peer, me, queue.popleft()))

    def _running(self, call, *args, **kwargs):
        self._active = True
        start = time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            self._active = False
            self.seconds_party += time.process_time() - start

    def _snapshot(self, previous: Snapshot | None, full: bool) -> Snapshot:
        start = time.process_time()
        snap = snapshot(self.server, self.public, previous, full)
        self.seconds_recording += time.process_time() - start
        return snap

    def forward(self, client_ids, step) -> None:
        ids = list(client_ids)
        steps = {c: step[c] for c in ids} if isinstance(step, dict) else dict.fromkeys(ids, step)
        # the state it starts from: its last after-state when it still holds exactly that (compared by
        # value; its frozen part by version, the after-state compares it in full), else a new snapshot
        self._current = Transition(self.count, ids, steps, {}, bool(self.updates()),
                                   self.given_before or self._snapshot(self._last, full=False))
        try:
            self._running(self._forward, client_ids, step)
        finally:
            self._take(ids, self.wiring[1], "activation")

    def backward(self, step: int | None = None, skip=None) -> None:
        current = self._current
        if current is not None:
            current.skip = dict(skip or {})
        try:
            self._running(self._backward, step, skip=skip)
        finally:
            if current is not None:
                self._take([c for c in current.client_ids if c not in current.skip], self.wiring[2], "gradient")
                self._current = None
                current.after = self._last = self._snapshot(current.before, full=self.full_after)
                start = time.process_time()
                current.commitment = current.after.digest()
                self.seconds_recording += time.process_time() - start
                self.count += 1
                self.on_transition(current)


@dataclass
class PublicParty:
    """What anyone may rebuild of one server-side party from the public configuration: its trunk as built
    (public base weights, LoRA A drawn from the run's public seed, LoRA B zero), its adapter sets, learning
    rate and wiring, and the inbox taps the orchestrator gave it at build (a stage chain's). The orchestrator
    takes it when it builds the parties, before any party runs code
    (``suite.engine.training.build_session(keep_public=True)``); nothing here is the live party's."""

    trunk: nn.Module
    adapters: dict[int, str]
    lr: float
    name: str
    up: str | None
    down: str | None
    taps: list = field(default_factory=list)
    code: list | None = None  # ``code_fingerprint`` of the trunk, taken with it

    @classmethod
    def of(cls, server: Server, lr: float) -> PublicParty:
        trunk = copy.deepcopy(server.trunk)
        return cls(trunk, dict(server.adapters), lr, server.name, server.up, server.down, list(server.inbox_taps),
                   code_fingerprint(trunk))

    @property
    def wiring(self) -> tuple[str, str | None, str | None]:
        return self.name, self.up, self.down

    def build(self, transport, own: bool = True) -> Server:
        """A fresh party from the public build, with fresh optimisers; ``own``: on its own copy of the trunk
        (False: on this trunk itself, for the one replica, which writes only trainable state to it: its
        fixed part stays the public one, and a later ``build`` overwrites the trainable state it copies)."""
        trunk = copy.deepcopy(self.trunk) if own else self.trunk
        return Server(trunk, transport, self.lr, adapters=dict(self.adapters) or None,
                      device=_device(self.trunk), name=self.name, up=self.up, down=self.down)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


# the hook dictionaries of a module: a hook on the replica's trunk changes what it computes
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def code_fingerprint(trunk: nn.Module) -> list:
    """The code the replica runs, as the objects themselves (compared by identity): every attribute of every
    class (MRO) of ``Server`` and of the trunk's modules, every module's own (instance) callables and
    hook dictionaries' contents, and torch's global module hooks. A method patched at class level (which the
    live party's trunk shares in process), or a hook put on the public copy, changes it. Not covered: a
    patched function the classes call (``torch.nn.functional``...): see docs/pipeline.md, an in-process
    verifier shares code with the party."""
    from torch.nn.modules import module as torch_module

    out: list = []
    classes: dict[type, None] = {}
    for module in [Server, *(type(m) for m in trunk.modules())]:
        for cls in module.__mro__:
            if cls is not object:
                classes.setdefault(cls, None)
    for cls in classes:
        out.append(cls)
        out.extend((cls, k, v) for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__", "__doc__"))
    for name, module in trunk.named_modules():
        out.append((name, type(module)))
        out.extend((name, k, v) for k, v in vars(module).items() if callable(v) and not isinstance(v, nn.Module | type))
        for hooks in _HOOK_DICTS:
            out.extend((name, hooks, k, v) for k, v in dict(getattr(module, hooks, {}) or {}).items())
    for g in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks", "_global_module_registration_hooks"):
        out.extend((g, k, v) for k, v in dict(getattr(torch_module, g, {}) or {}).items())
    return out


def same_code(a: list, b: list) -> bool:
    """Whether two ``code_fingerprint`` lists hold the same objects in the same places."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) != len(y) or any(u != v if isinstance(u, str) else u is not v
                                       for u, v in zip(x, y, strict=True)):
                return False
        elif x is not y:
            return False
    return True


class Replica:
    """The verifier's copy of one party, built from its public build (``PublicParty``: public frozen weights,
    public adapter configuration, the public initial state); never the live party's objects. Its trunk's
    fixed part is never written (a replay restores trainable state only), so it is also the public reference
    of the party's fixed part (``public``). ``code``: the fingerprint of the code it runs, taken at build;
    ``code_changed()`` says whether it changed since (in process, the party shares that code)."""

    def __init__(self, public: PublicParty):
        self.server = public.build(InProcessTransport(), own=False)  # no second copy of the trunk
        self.public = PublicFixed(self.server.trunk)
        self.initial = snapshot(self.server, self.public)  # the state the party's first transition starts from
        self._done: list[Transition] = []
        # records what it sends as the party's recorder does; whether it steps is set per replay
        self._updates = True
        self._recorder = TransitionRecorder(self.server, self._done.append, lambda: self._updates, self.public)
        # its fixed part is the public tensors themselves (``public`` holds views of them): compared by version
        self._recorder.full_after = False
        # taken with the public build when the orchestrator kept it, before any party ran code
        self.code = public.code if public.code is not None else code_fingerprint(self.server.trunk)

    def code_changed(self) -> bool:
        """Whether the code the replica runs changed since it was built (and take the new code as the
        reference, so that one change is reported once)."""
        now = code_fingerprint(self.server.trunk)
        if same_code(now, self.code):
            return False
        self.code = now
        return True

    def replay(self, t: Transition) -> Transition:
        """What an honest step computes from ``t.before`` and ``t.received`` (its ``after`` and ``sent``);
        ``t.updates`` (the orchestrator's word) says whether it steps. A ``ProtocolError`` when the recorded
        inputs are not what a step consumes."""
        s = self.server
        s.transport = transport = InProcessTransport()
        self._recorder.attach(transport)
        restore(s, t.before)
        self._recorder.given_before = t.before  # what it now holds
        s.updates = self._updates = t.updates
        for src, dst, data in t.received:
            transport.send(src, dst, data)
        self._done.clear()
        s.forward(t.client_ids, t.steps)
        try:
            s.backward(skip=t.skip)
        except UpdateRefused:
            pass
        return self._done[-1]


def become_standby(party: Server, public: PublicParty, state: Snapshot, transport: Transport) -> None:
    """Turn the excluded ``party`` object into a standby: a fresh party from the public build with
    ``state``'s trainable weights and optimiser states, on ``transport`` (the orchestrator's link, never the
    party's own ``transport`` attribute). Every attribute of the excluded object goes (its trunk with
    whatever it did to its frozen weights or settings, its transport, its policy, any method it replaced; a
    subclass's class too); the object stays, so whoever holds it (the step functions, a stage chain, the
    session) now talks to the standby. Its inbox taps are only the orchestrator's: those it gave the party at
    build (``public.taps``) and those its own code registered since (the traffic capture's, defined in
    ``suite.experiment`` / ``suite.engine``); a tap the party (or code acting for it) added is dropped, and
    so is a transition recorder's: whoever audits the standby records it anew."""
    fresh = public.build(transport)
    restore(fresh, state)
    fresh.bounds = party.bounds
    fresh.inbox_taps = [tap for tap in party.inbox_taps if _orchestrators(tap, public)]
    fresh.optimizer_steps = dict(party.optimizer_steps)  # the seat's training budget, spent so far
    party.__class__ = Server
    party.__dict__.clear()
    party.__dict__.update(fresh.__dict__)


_ORCHESTRATOR_MODULES = ("suite.experiment.", "suite.engine.")


def _orchestrators(tap, public: PublicParty) -> bool:
    """Whether an inbox tap is the orchestrator's: given at build, or defined in its own modules (in process
    a party can forge the latter, as it can patch any shared code: docs/pipeline.md)."""
    if any(tap is t or tap == t for t in public.taps):
        return True
    owner = getattr(tap, "__self__", None)
    if isinstance(owner, TransitionRecorder):
        return False
    module = getattr(tap, "__module__", None) or getattr(type(owner), "__module__", "")
    return isinstance(module, str) and module.startswith(_ORCHESTRATOR_MODULES)


def messages_differ(a: list[tuple[str, str, ActivationMsg | GradientMsg]],
                    b: list[tuple[str, str, ActivationMsg | GradientMsg]]) -> float:
    """The largest absolute difference between two runs' messages out (inf when they are not the same
    messages: count, endpoints, kind, client, step or shape)."""
    if len(a) != len(b):
        return float("inf")
    worst_ = 0.0
    for (sa, da, ma), (sb, db, mb) in zip(a, b, strict=True):
        if isinstance(ma, bytes) and isinstance(mb, bytes) and ma == mb:
            continue  # the same bytes: the same message
        ma, mb = (decode(m) if isinstance(m, bytes) else m for m in (ma, mb))
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
