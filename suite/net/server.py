"""`splitleak serve`: the server process. Holds the trunk, serves clients over gRPC + mTLS.

The gRPC handlers are threads; every touch of the model happens under one lock, in an order the strategy
decides:

* ``serial`` and ``per_client`` — a client's forward pass takes the *turn* and its backward pass gives it
  back, so one client's step is never interleaved with another's (the shared adapters are updated in
  place). A client that dies holding the turn loses it after ``turn_timeout`` seconds without a word.
* ``batch_parallel`` — a *round* collects the activations of the clients due (all of them, or those that
  arrived within ``round_timeout`` of the first), runs the trunk once over them (rows in client order) and
  waits for their gradients the same way. The round is a state machine with a deadline of ``round_timeout``
  in every state (``_Round``), moved on by every handler that touches or waits on it, so no client, silent,
  malformed or crashed, holds the others beyond ``round_timeout``: a client that sends no gradient in time,
  or says Hello again (it restarted), is dropped from the round and its rows count as a zero gradient (the
  others' update is applied: the partial-update rule); a round in which no gradient came is aborted with
  nothing applied, and its clients retry the step (ABORTED). Should the trunk pass fail anyway, the round
  is aborted the same way. A client a round closed without at its deadline is not waited for again until it
  sends (one that stopped, or finished, holds up one round, not every one). A client that sends a malformed message is told so (INVALID_ARGUMENT) and
  dropped until it says Hello again (its gradient counts as zero).

Every message is checked before it reaches the trunk (``suite.engine.protocol.Expect``): shapes, dtypes,
exactly the model's hidden size, finite values, at most ``batch_size`` rows and ``max_length`` positions,
and a magnitude bound: no position's L2 norm above ``bound_margin`` (default 100) times the largest one the
public base model gives on a fixed public text sample (``public_bounds``: activations through the public
head, gradients of the summed token loss through the public tail). And an update that would make a trunk
value non-finite is never applied (``suite.engine.parties.Server.backward``): the client that caused it is
dropped from that step with an error; the others' update goes on.

A killed client reconnects (new AEAD channel) and resumes from its own checkpoint; the other clients never
stop. The server checkpoints its trainable weights and optimisers every ``checkpoint_every`` completed
client steps and restores them when it restarts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from suite.engine.channel import IntegrityError, ServerEnd, ServerKeys
from suite.engine.parties import Server, UpdateRefused
from suite.engine.protocol import (
    REVEAL,
    REVEAL_REQUEST,
    TO_SERVER,
    ActivationMsg,
    Bounds,
    GradientMsg,
    decode,
    decode_control,
    encode,
    encode_control,
    peek,
)
from suite.engine.transport import SERVER, InProcessTransport, client_endpoint
from suite.errors import ProtocolError
from suite.net import checkpoint
from suite.net.certs import Identity
from suite.net.link import DEFAULT_MAX_MESSAGE_MIB, caller_name, generic_handler, start_tls_server

DEFAULT_BOUND_MARGIN = 100.0

# Public text for measuring the base model's magnitudes: public-domain prose, code, and lines in the shape of
# the records the suite generates (names, dates, numbers, addresses, e-mail), all invented or public.
PUBLIC_SAMPLE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "We hold these truths to be self-evident, that all men are created equal.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse.",
    "In the beginning God created the heaven and the earth.",
    "The quick brown fox jumps over the lazy dog 1234567890 times; 3.14159 + 2.71828 = 5.85987.",
    "Patient Jane Doe, born 1970-01-01, phone 555-0100, jane.doe@example.com, 1 Main Street, Springfield.",
    "Account 0000 1111 2222 3333 of John Smith, 221B Baker Street, London NW1 6XE, diagnosed with asthma.",
    "def main():\n    print('hello, world')\n    return 0\n",
)


def public_bounds(split, tokenizer, max_length: int, rows: int, margin: float = DEFAULT_BOUND_MARGIN) -> Bounds:
    """The bounds a server holds every client to, from public things only: ``rows`` (the batch size), the
    configured ``max_length``, and magnitudes measured on ``PUBLIC_SAMPLE`` through the *public base* model
    (``split``'s own head, trunk and tail, never a client's trained copy): ``margin`` times the largest L2
    norm of one position of the head's output (activations), and of the gradient of the *summed* token loss
    with respect to the trunk's output (gradients: a client's loss is a mean over at least one token, so its
    gradients are no larger than that sum's, up to the tail's training). The margin leaves room for the
    clients' fine-tuning; a deployment whose clients add noise to what they send (DP) must size it for that."""
    import torch.nn.functional as F

    from suite.engine.device import module_device
    from suite.engine.split import position_ids_for
    from suite.experiment.data import Record, tokenize

    if not margin > 0:
        raise ProtocolError(f"the bound margin must be > 0, got {margin}")
    enc = tokenize([Record(t) for t in PUBLIC_SAMPLE], tokenizer, max_length)
    mask, positions = enc["attention_mask"], position_ids_for(enc["attention_mask"])

    def on(module, *tensors):
        device = module_device(module)
        return [t.to(device) for t in tensors]

    head, trunk, tail = split.client_head, split.server_trunk, split.client_tail
    with torch.no_grad():
        acts = head(*on(head, enc["input_ids"], mask, positions))
        out = trunk(*on(trunk, acts, mask, positions))
    out = out.detach().to(module_device(tail)).requires_grad_(True)
    logits = tail(out, *on(tail, mask, positions))
    labels = enc["labels"].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")
    (grad,) = torch.autograd.grad(loss, out)
    act = float(torch.linalg.vector_norm(acts.float(), dim=-1).max())
    grd = float(torch.linalg.vector_norm(grad.float(), dim=-1).max())
    return Bounds(rows=rows, length=max_length, activation_norm=margin * act, gradient_norm=margin * grd)


@dataclass
class _Round:
    """One ``batch_parallel`` round: a state machine with a deadline in every state, ``round_timeout`` after
    the state began (``SplitService._advance``).

    * ``collecting`` — activations arrive; closed by the last client due, or at the deadline (counted from
      the first arrival), by one trunk pass over the rows: ``forwarded`` (``aborted`` if the pass fails).
    * ``forwarded`` — gradients arrive; closed by the last one, or at the deadline: a client that sent none
      by then is dropped from the round and its rows count as a zero gradient. Backward pass: ``answered``;
      ``aborted`` (nothing applied) when no gradient came at all or the pass failed.
    * ``answered`` — each client whose update was applied collects its reply; closed when all have, or at
      the deadline (a reply nobody collected is dropped). Then the next round opens.
    * ``aborted`` — every client still waiting in it is told to retry its step (ABORTED); the next round
      opens at once.
    """

    arrived: dict[int, int] = field(default_factory=dict)  # client -> step
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    state: str = "collecting"  # collecting -> forwarded -> answered, or aborted
    since: float = 0.0  # when the current state began (collecting: at the first arrival)
    grads: set[int] = field(default_factory=set)  # clients whose gradient is queued for the backward pass
    dropped: dict[int, str] = field(default_factory=dict)  # clients dropped from this round -> why
    answered: set[int] = field(default_factory=set)  # clients with a reply to the gradient to collect
    replied: set[int] = field(default_factory=set)
    why: str = ""  # why the round was aborted


class SplitService:
    """The gRPC side of a ``suite.engine.parties.Server``: decrypts, orders and feeds it the clients' messages."""

    def __init__(self, server: Server, strategy: str, clients: int, config_hash: str, *,
                 key_exchange: str = "x25519", turn_timeout: float = 30.0,
                 round_timeout: float = 30.0, checkpoint_path: str | Path | None = None, checkpoint_every: int = 1,
                 bounds: Bounds | None = None, defense_label: str = "none"):
        self.server = server
        self.defense_label = defense_label  # the agreed defense and its public parameters (for the error line)
        if bounds is not None:
            server.bounds = bounds  # rows, length, magnitude of every message (``public_bounds``)
        self.queue = InProcessTransport()
        server.transport = self.queue
        self.strategy = strategy
        self.clients = clients
        self.config_hash = config_hash
        self.end = ServerEnd(ServerKeys(key_exchange))
        self.turn_timeout = turn_timeout
        self.round_timeout = round_timeout
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_every = max(1, checkpoint_every)
        self.cv = threading.Condition()
        self.holder: int | None = None
        self.last_seen = 0.0
        self.round = _Round()
        self.completed: dict[int, int] = {}  # client -> completed steps served
        self.dropped: dict[int, str] = {}  # clients dropped (malformed, silent, refused) -> why, until they call again
        self.absent: set[int] = set()  # clients a round closed without at its deadline: not waited for until they send
        self.events: list[str] = []  # what happened to whom (for logs and tests)
        self.reveals = 0  # committed states revealed to the integrity audit (``reveal``)
        self._restore()

    # --- identity and the first two calls ------------------------------------------------------------

    def _who(self, context: grpc.ServicerContext) -> int:
        """The caller's client id, from its certificate (over TLS 1.3 only: ``caller_name``)."""
        name = caller_name(context, "this server")
        if not name.startswith("client-") or not name[7:].isdigit() or int(name[7:]) >= self.clients:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate {name!r} is not one of this server's "
                          f"{self.clients} clients")
        return int(name[7:])

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        client = self._who(context)
        try:
            asked = json.loads(request)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello expects JSON")
        if asked.get("client_id") != client:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"client claims id {asked.get('client_id')} but its certificate is client-{client}")
        if asked.get("config") != self.config_hash:  # final: retrying cannot help (INVALID_ARGUMENT)
            if asked.get("defense") != self.defense_label:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"client and server were started with different defenses (client: "
                              f"{json.dumps(str(asked.get('defense')))[:200]}; server: {self.defense_label}): start "
                              "both with "
                              "the same --defense and --defense-param")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "client and server were started with different experiment configs (model, split, data, "
                          "training): start both from the same config file")
        with self.cv:
            self._forget(client, "hello")
            self.dropped.pop(client, None)
            self.absent.discard(client)
            public = self.end.public_for(client_endpoint(client))  # with a fresh one-time handshake challenge
        return json.dumps({**public, "strategy": self.strategy, "clients": self.clients}).encode()

    def handshake(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        client = self._who(context)
        with self.cv:
            try:
                self.end.accept(client_endpoint(client), request)
            except IntegrityError as err:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        return b""

    def _forget(self, client: int, why: str) -> None:
        """A client (re)connected: whatever it left half-done is void."""
        rnd = self.round
        if self.strategy == "batch_parallel" and client in rnd.arrived and client not in rnd.dropped:
            if rnd.state == "collecting":  # not yet in a trunk pass: it simply leaves
                del rnd.arrived[client], rnd.shapes[client]
                self._drain(client)
                self.events.append(f"client {client} left the collecting round ({why})")
            elif rnd.state == "forwarded" and client not in rnd.grads:
                self._leave(rnd, client, f"it reconnected before sending its gradient ({why})")
            else:
                rnd.replied.add(client)  # it will not collect its reply
            self._advance()
            self.cv.notify_all()
        if self.holder == client:
            self.server.discard_pending()
            self._drain(client)
            self.holder = None
            self.events.append(f"client {client} dropped its turn ({why})")
            self.cv.notify_all()

    def _drain(self, client: int) -> None:
        ep = client_endpoint(client)
        for key in [(ep, SERVER), (SERVER, ep)]:
            self.queue._queues.pop(key, None)

    # --- the protocol --------------------------------------------------------------------------------

    def exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        client = self._who(context)
        ep = client_endpoint(client)
        with self.cv:
            if ep not in self.end.channels:  # e.g. this server restarted since the client's handshake
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no secure channel with this client: say Hello again")
            try:
                plain = self.end.open(ep, request)
            except IntegrityError as err:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            kind, meta = peek(plain)
            if meta.get("client_id") != client:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"message for client {meta.get('client_id')} sent with client-{client}'s certificate")
            step = meta.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or step < 0 or kind not in ("activation",
                                                                                                 "gradient"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: kind {kind!r}, step {step!r}")
            try:
                if self.strategy == "batch_parallel":
                    reply = self._parallel(client, kind, step, plain, context)
                else:
                    reply = self._turn(client, kind, step, plain, context)
            except ProtocolError as err:
                self._forget(client, f"protocol error: {err}")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return self.end.seal(ep, reply)

    def reveal(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The integrity audit's reveal: the trunk state this server committed to in the caller's reply of the
        step it names (``Server.reveal``), sealed on the caller's channel. Only for the caller's own steps (its
        certificate), and only once that reply was committed and sent; refused when the server does not commit
        (no ``integrity_audit`` agreed)."""
        client = self._who(context)
        ep = client_endpoint(client)
        with self.cv:
            if ep not in self.end.channels:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no secure channel with this client: say Hello again")
            try:
                plain = self.end.open(ep, request)
            except IntegrityError as err:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            try:
                cid, step, _ = decode_control(plain, REVEAL_REQUEST)
                if cid != client:
                    raise ProtocolError(f"reveal asked for client {cid} with client-{client}'s certificate")
                if not self.server.commit_state:
                    raise ProtocolError("this server commits to nothing (no integrity_audit agreed): nothing to reveal")
                state = self.server.reveal(client, step)
            except ProtocolError as err:
                context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            if self.holder == client:  # auditing its step: the client is not silent
                self.last_seen = time.monotonic()
            self.reveals += 1
            return self.end.seal(ep, encode_control(REVEAL, client, step, state))

    def _wait(self, context: grpc.ServicerContext, until, deadline: float | None = None) -> bool:
        """Wait (releasing the lock) until ``until()``; False on deadline or when the caller went away."""
        while True:
            if self.strategy == "batch_parallel":
                self._advance()
            if until():
                return True
            if not context.is_active():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.cv.wait(timeout=0.05)

    def _turn(self, client: int, kind: str, step: int, plain: bytes, context) -> bytes:
        ep = client_endpoint(client)
        if kind == "activation":
            def free() -> bool:
                if self.holder is not None and time.monotonic() - self.last_seen > self.turn_timeout:
                    self._forget(self.holder, f"silent for {self.turn_timeout:.0f} s")
                return self.holder in (None, client)

            if not self._wait(context, free):
                context.abort(grpc.StatusCode.CANCELLED, "gave up waiting for the turn")
            if self.holder == client:  # it restarted its step without finishing the last one
                self._forget(client, "restarted its step")
            self.holder, self.last_seen = client, time.monotonic()
            self.queue.send(ep, SERVER, plain)
            self.server.forward([client], step)
            self.last_seen = time.monotonic()
            return self.queue.recv(ep, SERVER)
        if self.holder != client or self.server.pending_clients != [client]:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"gradient from client {client} without a pending forward pass (its turn timed out?)")
        self.queue.send(ep, SERVER, plain)
        self.server.backward()
        reply = self.queue.recv(ep, SERVER)
        self.holder = None
        self._completed([client])
        self.cv.notify_all()
        return reply

    def _drop(self, client: int, err: ProtocolError, context, rnd: _Round | None = None) -> None:
        """Drop a client that sent a malformed message (from ``rnd`` too, if given): the round goes on
        without it; it is told why."""
        self.dropped[client] = str(err)
        self.events.append(f"client {client} dropped from batch_parallel: {err}")
        if rnd is not None:
            rnd.dropped[client] = str(err)
            self._advance()
        self.cv.notify_all()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dropped from the round: {err}")

    def _leave(self, rnd: _Round, client: int, why: str) -> None:
        """Drop ``client`` from ``rnd`` (it is told ``why`` when it next calls) and from the rounds after it
        until it sends again; its rows count as a zero gradient."""
        rnd.dropped[client] = why
        self.dropped[client] = why
        self.events.append(f"client {client} dropped from batch_parallel round: {why}")

    def _due(self, rnd: _Round) -> int:
        """How many clients the collecting round waits for: all, less those dropped or absent and not in it
        (so a client that stopped sending, or finished, holds up one round, not every one)."""
        return self.clients - len((self.dropped.keys() | self.absent) - rnd.arrived.keys())

    def _advance(self) -> None:
        """Move the current round on when its state is complete or its deadline has passed (under the lock;
        every ``batch_parallel`` handler calls it, waiting or not, so a round moves on without its clients)."""
        rnd = self.round
        late = time.monotonic() >= rnd.since + self.round_timeout
        if rnd.state == "collecting" and rnd.arrived and (late or len(rnd.arrived) >= self._due(rnd)):
            self._forward(rnd)
        elif rnd.state == "forwarded":
            waiting = set(rnd.arrived) - rnd.grads - set(rnd.dropped)
            if waiting and late:
                for c in sorted(waiting):
                    self._leave(rnd, c, f"it sent no gradient within the round timeout ({self.round_timeout:g} s)")
                waiting = set()
            if not waiting:
                self._backward(rnd)
        elif rnd.state == "answered" and (late or rnd.replied >= rnd.answered):
            self._next_round()

    def _forward(self, rnd: _Round) -> None:
        ids = sorted(rnd.arrived)
        missing = sorted(set(range(self.clients)) - set(ids) - self.dropped.keys() - self.absent)
        if len(ids) < self._due(rnd) and missing:  # closed at the deadline without them
            self.absent.update(missing)
            self.events.append(f"round closed at its deadline without clients {missing}: not waited for until "
                               "they send")
        try:
            self.server.forward(ids, dict(rnd.arrived))
        except Exception as err:  # abort the round rather than leave it collecting forever
            self.server.discard_pending()
            self._abort(rnd, f"the trunk pass failed ({err})")
            return
        rnd.state, rnd.since = "forwarded", time.monotonic()
        self.cv.notify_all()

    def _backward(self, rnd: _Round) -> None:
        good = sorted(rnd.grads)
        if not good:
            self.server.discard_pending()
            self._abort(rnd, "no client of the round sent a usable gradient; nothing was applied")
            return
        for m in sorted(set(rnd.arrived) - rnd.grads):  # dropped from the round: a zero gradient
            zero = GradientMsg(m, rnd.arrived[m], TO_SERVER, torch.zeros(rnd.shapes[m]))
            self.queue.send(client_endpoint(m), SERVER, encode(zero))
            self.events.append(f"client {m} sent no gradient in its round: counted as zero")
        refused: dict[int, str] = {}
        try:
            self.server.backward()
        except UpdateRefused as err:  # the others were served; these get an error
            refused = err.clients
        except Exception as err:  # abort the round rather than leave it forwarded forever
            self.server.discard_pending()
            self._abort(rnd, f"the backward pass failed ({err})")
            return
        for c, why in refused.items():
            self._leave(rnd, c, why)
        rnd.answered = set(good) - set(refused)
        rnd.state, rnd.since = "answered", time.monotonic()
        if rnd.answered:
            self._completed(sorted(rnd.answered))
        self._advance()
        self.cv.notify_all()

    def _abort(self, rnd: _Round, why: str) -> None:
        rnd.state, rnd.why = "aborted", why
        self.events.append(f"round of clients {sorted(rnd.arrived)} aborted: {why}")
        self._next_round()

    def _next_round(self) -> None:
        """Open the next round; whatever the old one left in the queues (replies nobody collected) goes."""
        for c in self.round.arrived:
            self._drain(c)
        self.round = _Round()
        self.cv.notify_all()

    def _left(self, rnd: _Round, client: int, context) -> None:
        """Tell a client waiting in ``rnd`` that it is no longer served there, if so."""
        if rnd.state == "aborted":
            context.abort(grpc.StatusCode.ABORTED, f"the round was aborted ({rnd.why}); retry the step")
        if client in rnd.dropped:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dropped from the round: {rnd.dropped[client]}")
        if client not in rnd.arrived or rnd is not self.round:
            context.abort(grpc.StatusCode.ABORTED, "the round went on without this call (the client reconnected "
                          "or was too slow); retry the step")

    @staticmethod
    def _check_own(msg, kind: type, step: int) -> None:
        """What ``Server._recv`` would refuse inside the round (voiding it for all) is refused here."""
        if not isinstance(msg, kind) or msg.step != step or msg.direction != TO_SERVER:
            raise ProtocolError(f"expected a {kind.__name__} to the server for step {step}, got a "
                                f"{type(msg).__name__} {msg.direction} for step {msg.step}")

    def _parallel(self, client: int, kind: str, step: int, plain: bytes, context) -> bytes:
        ep = client_endpoint(client)
        if kind == "activation":
            try:
                msg = decode(plain, self.server.expect(kind="activation"))
                self._check_own(msg, ActivationMsg, step)
            except ProtocolError as err:
                self._drop(client, err, context)
            if not self._wait(context, lambda: self.round.state == "collecting" and client not in self.round.arrived):
                context.abort(grpc.StatusCode.CANCELLED, "gave up waiting for a round")
            rnd = self.round
            if not rnd.arrived:
                rnd.since = time.monotonic()
            rnd.arrived[client] = step
            rnd.shapes[client] = tuple(msg.hidden.shape)
            self.dropped.pop(client, None)
            self.absent.discard(client)
            self.queue.send(ep, SERVER, plain)
            self.cv.notify_all()
            if not self._wait(context, lambda: rnd.state != "collecting" or client not in rnd.arrived):
                if rnd.state == "collecting" and client in rnd.arrived:  # gone before the pass: it leaves
                    del rnd.arrived[client], rnd.shapes[client]
                    self._drain(client)
                    self.cv.notify_all()
                context.abort(grpc.StatusCode.CANCELLED, "gave up waiting for the round")
            self._left(rnd, client, context)
            return self.queue.recv(ep, SERVER)
        self._advance()
        rnd = self.round
        if rnd.state != "forwarded" or client not in rnd.arrived or client in rnd.grads or client in rnd.dropped:
            why = self.dropped.get(client)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"gradient from client {client} outside its round"
                          + (f" (dropped from it: {why})" if why else ""))
        try:
            msg = decode(plain, self.server.expect(rnd.shapes[client], "gradient"))
            self._check_own(msg, GradientMsg, rnd.arrived[client])
        except ProtocolError as err:
            self._drop(client, err, context, rnd)
        self.queue.send(ep, SERVER, plain)
        rnd.grads.add(client)
        self.cv.notify_all()
        if not self._wait(context, lambda: rnd.state != "forwarded"):
            context.abort(grpc.StatusCode.CANCELLED, "gave up waiting for the round")  # its gradient still counts
        self._left(rnd, client, context)
        reply = self.queue.recv(ep, SERVER)
        rnd.replied.add(client)
        self._advance()
        self.cv.notify_all()
        return reply

    # --- checkpoints ---------------------------------------------------------------------------------

    def _completed(self, clients: list[int]) -> None:
        for c in clients:
            self.completed[c] = self.completed.get(c, 0) + 1
        if self.checkpoint_path and sum(self.completed.values()) % self.checkpoint_every == 0:
            self.save()

    def save(self) -> None:
        checkpoint.save(self.checkpoint_path, {
            "config": self.config_hash,
            **checkpoint.party_state(self.server.trunk, self.server.optimizers),
            "completed": {str(c): n for c, n in self.completed.items()},
        })

    def _restore(self) -> None:
        if not self.checkpoint_path:
            return
        state = checkpoint.load(self.checkpoint_path)
        if state is None:
            return
        if state["config"] != self.config_hash:
            raise ProtocolError(f"server checkpoint {self.checkpoint_path} belongs to another config; delete it or "
                                "point --checkpoint elsewhere")
        checkpoint.load_party(self.server.trunk, self.server.optimizers, state)
        self.completed = {int(c): n for c, n in state["completed"].items()}
        self.events.append(f"restored from {self.checkpoint_path} after {sum(self.completed.values())} client steps")


def start_server(service: SplitService, identity: Identity, listen: str, *,
                 max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> tuple[grpc.Server, int]:
    """Start serving on ``listen`` (``host:port``; port 0 picks one). Returns the server and its port. Every
    client may have a call waiting for its turn or round, so there is a handler thread per client and spare."""
    return start_tls_server(generic_handler(service.hello, service.handshake, service.exchange, service.reveal),
                            identity, listen, threads=2 * service.clients + 4, max_message_mib=max_message_mib)
