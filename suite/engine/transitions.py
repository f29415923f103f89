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
* ``Replica`` is the verifier's own copy of the party's modules (the public frozen weights and the public
  adapter configuration, taken before training: no access to the live party). ``replay`` loads a committed
  state, feeds it the recorded messages and returns what an honest step makes of them: its state after and
  its messages out.
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

from suite.engine.commitment import trainable_state
from suite.engine.parties import Server, UpdateRefused
from suite.engine.protocol import ActivationMsg, GradientMsg, encode
from suite.engine.transport import InProcessTransport


@dataclass
class Snapshot:
    """A party's trainable weights and optimiser states (by adapter set): what a transition changes."""

    weights: dict[str, torch.Tensor]
    optimizers: dict[str | None, dict | None]

    def digest(self) -> bytes:
        """sha256 of every tensor and number of the snapshot: the party's commitment to it."""
        h = hashlib.sha256(b"splitleak-transition-v1")

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


def snapshot(server: Server) -> Snapshot:
    return Snapshot(trainable_state(server.trunk),
                    {k: copy.deepcopy(o.state_dict()) if o is not None else None for k, o in server.optimizers.items()})


def restore(server: Server, snap: Snapshot) -> None:
    """Load ``snap`` into ``server`` (its weights in place, its optimisers' states)."""
    params = dict(server.trunk.named_parameters())
    with torch.no_grad():
        for name, value in snap.weights.items():
            params[name].copy_(value)
    for k, opt in server.optimizers.items():
        if opt is not None and snap.optimizers.get(k) is not None:
            opt.load_state_dict(copy.deepcopy(snap.optimizers[k]))


def difference(a: Snapshot, b: Snapshot) -> float:
    """The largest absolute difference between two snapshots' tensors (inf when their structure differs)."""
    if set(a.weights) != set(b.weights) or set(a.optimizers) != set(b.optimizers):
        return float("inf")
    worst = max((float((a.weights[k].float() - b.weights[k].float()).abs().max()) for k in a.weights
                 if a.weights[k].numel()), default=0.0)
    for k, sa in a.optimizers.items():
        sb = b.optimizers[k]
        if (sa is None) != (sb is None):
            return float("inf")
        if sa is None:
            continue
        if set(sa["state"]) != set(sb["state"]):
            return float("inf")
        for i, st in sa["state"].items():
            for name, v in st.items():
                w = sb["state"][i].get(name)
                if not isinstance(v, torch.Tensor) or not isinstance(w, torch.Tensor) or v.shape != w.shape:
                    return float("inf")
                if v.numel():
                    worst = max(worst, float((v.float() - w.float()).abs().max()))
    return worst


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
    Installs itself by wrapping the party's ``forward``, ``backward`` and ``_send`` and tapping its inbox."""

    def __init__(self, server: Server, on_transition: Callable[[Transition], None]):
        self.server = server
        self.on_transition = on_transition
        self.count = 0
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
        self._current = Transition(self.count, ids, steps, {}, self.server.updates, snapshot(self.server))
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
                current.after = snapshot(self.server)
                current.commitment = current.after.digest()
                self.count += 1
                self.on_transition(current)


class Replica:
    """The verifier's copy of one party: its modules as they were before training (public frozen weights,
    public adapter configuration), its wiring and bounds; never the live party's objects after that."""

    def __init__(self, server: Server):
        trunk = copy.deepcopy(server.trunk)
        lr = next((o.param_groups[0]["lr"] for o in server.optimizers.values() if o is not None), 1e-3)
        self.server = Server(trunk, InProcessTransport(), lr, adapters=dict(server.adapters) or None,
                             device=server.device, name=server.name, up=server.up, down=server.down)
        self.server.bounds = server.bounds
        self._done: list[Transition] = []
        TransitionRecorder(self.server, self._done.append)  # records what it sends as the party's recorder does

    def replay(self, t: Transition) -> Transition:
        """What an honest step computes from ``t.before`` and ``t.received`` (its ``after`` and ``sent``)."""
        s = self.server
        s.transport = transport = InProcessTransport()
        restore(s, t.before)
        s.updates = t.updates
        for src, dst, msg in t.received:
            transport.send(src, dst, encode(msg))
        self._done.clear()
        s.forward(t.client_ids, t.steps)
        try:
            s.backward(skip=t.skip)
        except UpdateRefused:
            pass
        return self._done[-1]


def _detached(msg: ActivationMsg | GradientMsg) -> ActivationMsg | GradientMsg:
    field_name = "hidden" if isinstance(msg, ActivationMsg) else "grad"
    return dataclasses.replace(msg, **{field_name: getattr(msg, field_name).detach()})


def messages_differ(a: list[tuple[str, str, ActivationMsg | GradientMsg]],
                    b: list[tuple[str, str, ActivationMsg | GradientMsg]]) -> float:
    """The largest absolute difference between two runs' messages out (inf when they are not the same
    messages: count, endpoints, kind, client, step or shape)."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for (sa, da, ma), (sb, db, mb) in zip(a, b, strict=True):
        if (sa, da) != (sb, db):
            return float("inf")
        if type(ma) is not type(mb) or ma.client_id != mb.client_id or ma.step != mb.step:
            return float("inf")
        ta = ma.hidden if isinstance(ma, ActivationMsg) else ma.grad
        tb = mb.hidden if isinstance(mb, ActivationMsg) else mb.grad
        if ta.shape != tb.shape:
            return float("inf")
        worst = max(worst, float((ta.float() - tb.float()).abs().max()))
    return worst
