"""`splitleak serve`: the server process. Holds the trunk, serves clients over gRPC + mTLS.

The gRPC handlers are threads; every touch of the model happens under one lock, in an order the strategy
decides:

* ``serial`` and ``per_client`` — a client's forward pass takes the *turn* and its backward pass gives it
  back, so one client's step is never interleaved with another's (the shared adapters are updated in
  place). A client that dies holding the turn loses it after ``turn_timeout`` seconds without a word.
* ``batch_parallel`` — a *round* collects the activations of the clients due (all of them, or those that
  arrived within ``round_timeout`` of the first), runs the trunk once over them (rows in client order) and
  waits for their gradients the same way; a client that died in between contributes a zero gradient.
  Every message is checked (shapes, dtypes, hidden size, finite values; ``suite.engine.protocol.Expect``) before it
  joins a round: a client that sends a malformed one is told so (INVALID_ARGUMENT) and dropped until it says
  Hello again, and the round goes on without it (its gradient counts as zero). Should the trunk pass fail
  anyway, the round is void and every client in it is told to retry (ABORTED): a round never wedges.

A killed client reconnects (new AEAD channel) and resumes from its own checkpoint; the other clients never
stop. The server checkpoints its trainable weights and optimisers every ``checkpoint_every`` completed
client steps and restores them when it restarts.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from suite.engine.channel import IntegrityError, ServerEnd, ServerKeys
from suite.engine.parties import Server
from suite.engine.protocol import TO_SERVER, GradientMsg, decode, encode, peek
from suite.engine.transport import SERVER, InProcessTransport, client_endpoint
from suite.errors import ProtocolError
from suite.net import checkpoint
from suite.net.certs import Identity
from suite.net.link import DEFAULT_MAX_MESSAGE_MIB, channel_options, generic_handler, server_credentials


@dataclass
class _Round:
    arrived: dict[int, int] = field(default_factory=dict)  # client -> step
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    state: str = "collecting"  # collecting -> forwarded -> answered
    opened: float = 0.0
    forwarded: float = 0.0
    grads: set[int] = field(default_factory=set)
    bad: set[int] = field(default_factory=set)  # clients dropped from this round for a malformed gradient
    replied: set[int] = field(default_factory=set)


class SplitService:
    """The gRPC side of a ``suite.engine.parties.Server``: decrypts, orders and feeds it the clients' messages."""

    def __init__(self, server: Server, strategy: str, clients: int, config_hash: str, *,
                 key_exchange: str = "x25519", turn_timeout: float = 30.0,
                 round_timeout: float = 30.0, checkpoint_path: str | Path | None = None, checkpoint_every: int = 1):
        self.server = server
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
        self.dropped: set[int] = set()  # clients dropped for malformed input, until their next Hello
        self.events: list[str] = []  # what happened to whom (for logs and tests)
        self._restore()

    # --- identity and the first two calls ------------------------------------------------------------

    def _who(self, context: grpc.ServicerContext) -> int:
        """The caller's client id, from its certificate; every call over anything but TLS 1.3 is refused
        here (gRPC Python has no minimum-version setting: a TLS 1.2 handshake completes, but no call on it
        is served)."""
        auth = context.auth_context()
        version = (auth.get("ssl_tls_version") or [b"?"])[0].decode(errors="replace")
        if version != "TLSv1.3":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this server requires TLS 1.3; the connection "
                          f"negotiated {version}")
        names = auth.get("x509_common_name") or []
        name = names[0].decode() if names else ""
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
        if asked.get("config") != self.config_hash:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "client and server were started with different experiment configs (model, split, data, "
                          "training): start both from the same config file")
        with self.cv:
            self._forget(client, "hello")
            self.dropped.discard(client)
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

    def _wait(self, context: grpc.ServicerContext, until, deadline: float | None = None) -> bool:
        """Wait (releasing the lock) until ``until()``; False on deadline or when the caller went away."""
        while not until():
            if not context.is_active():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.cv.wait(timeout=0.05)
        return True

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

    def _drop(self, client: int, err: ProtocolError, context) -> None:
        """Drop a client that sent a malformed message: the round goes on without it; it is told why."""
        self.dropped.add(client)
        self.events.append(f"client {client} dropped from batch_parallel: {err}")
        self.cv.notify_all()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dropped from the round: {err}")

    def _due(self, rnd: _Round) -> int:
        """How many clients the collecting round waits for: all, less those dropped and not in it."""
        return self.clients - len(self.dropped - set(rnd.arrived))

    def _parallel(self, client: int, kind: str, step: int, plain: bytes, context) -> bytes:
        ep = client_endpoint(client)
        if kind == "activation":
            try:
                msg = decode(plain, self.server.expect())
            except ProtocolError as err:
                self._drop(client, err, context)
            if not self._wait(context, lambda: self.round.state == "collecting" and client not in self.round.arrived):
                context.abort(grpc.StatusCode.CANCELLED, "gave up waiting for a round")
            self.dropped.discard(client)
            rnd = self.round
            if not rnd.arrived:
                rnd.opened = time.monotonic()
            rnd.arrived[client] = step
            rnd.shapes[client] = tuple(msg.hidden.shape)
            self.queue.send(ep, SERVER, plain)
            self.cv.notify_all()
            self._wait(context, lambda: rnd.state != "collecting" or len(rnd.arrived) >= self._due(rnd),
                       rnd.opened + self.round_timeout)
            if rnd.state == "collecting":  # this handler closes the round: one trunk pass over all rows
                ids = sorted(rnd.arrived)
                try:
                    self.server.forward(ids, {c: rnd.arrived[c] for c in ids})
                except Exception as err:  # void the round rather than leave it collecting forever
                    self.server.discard_pending()
                    for c in ids:
                        self._drain(c)
                    rnd.state = "failed"
                    self.round = _Round()
                    self.events.append(f"round of clients {ids} failed in the trunk ({err}); voided")
                    self.cv.notify_all()
                    context.abort(grpc.StatusCode.ABORTED, "the round failed on the server; retry the step")
                rnd.state, rnd.forwarded = "forwarded", time.monotonic()
                self.cv.notify_all()
            if rnd.state == "failed":
                context.abort(grpc.StatusCode.ABORTED, "the round failed on the server; retry the step")
            return self.queue.recv(ep, SERVER)
        rnd = self.round
        if rnd.state != "forwarded" or client not in rnd.arrived or client in rnd.grads or client in rnd.bad:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"gradient from client {client} outside its round")
        try:
            decode(plain, self.server.expect(rnd.shapes[client]))
        except ProtocolError as err:
            rnd.bad.add(client)
            self._drop(client, err, context)
        self.queue.send(ep, SERVER, plain)
        rnd.grads.add(client)
        self.cv.notify_all()
        self._wait(context, lambda: rnd.state != "forwarded" or rnd.grads | rnd.bad == set(rnd.arrived),
                   rnd.forwarded + self.round_timeout)
        if rnd.state == "forwarded":  # close: a client that died or was dropped since the forward adds nothing
            missing = sorted(set(rnd.arrived) - rnd.grads)
            for m in missing:
                zero = GradientMsg(m, rnd.arrived[m], TO_SERVER, torch.zeros(rnd.shapes[m]))
                self.queue.send(client_endpoint(m), SERVER, encode(zero))
                self.events.append(f"client {m} sent no gradient in its round: counted as zero")
            try:
                self.server.backward()
            except Exception as err:  # void the round rather than leave it forwarded forever
                for c in rnd.arrived:
                    self._drain(c)
                rnd.state = "failed"
                self.round = _Round()
                self.events.append(f"round of clients {sorted(rnd.arrived)} failed in backward ({err}); voided")
                self.cv.notify_all()
                context.abort(grpc.StatusCode.ABORTED, "the round failed on the server; retry the step")
            for m in missing:
                self.queue.recv(client_endpoint(m), SERVER)
            rnd.state = "answered"
            self._completed(sorted(rnd.grads))
        if rnd.state == "failed":
            context.abort(grpc.StatusCode.ABORTED, "the round failed on the server; retry the step")
        reply = self.queue.recv(ep, SERVER)
        rnd.replied.add(client)
        if rnd.replied == rnd.grads:
            self.round = _Round()
        self.cv.notify_all()
        return reply

    # --- checkpoints ---------------------------------------------------------------------------------

    def _completed(self, clients: list[int]) -> None:
        for c in clients:
            self.completed[c] = self.completed.get(c, 0) + 1
        if self.checkpoint_path and sum(self.completed.values()) % self.checkpoint_every == 0:
            self.save()

    def save(self) -> None:
        optimizers = {str(k): opt.state_dict() for k, opt in self.server.optimizers.items() if opt is not None}
        checkpoint.save(self.checkpoint_path, {
            "config": self.config_hash,
            "weights": checkpoint.trainable_state({"trunk": self.server.trunk}),
            "optimizers": optimizers,
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
        checkpoint.load_trainable({"trunk": self.server.trunk}, state["weights"])
        for k, opt in self.server.optimizers.items():
            if opt is not None and str(k) in state["optimizers"]:
                opt.load_state_dict(state["optimizers"][str(k)])
        self.completed = {int(c): n for c, n in state["completed"].items()}
        self.events.append(f"restored from {self.checkpoint_path} after {sum(self.completed.values())} client steps")


def start_server(service: SplitService, identity: Identity, listen: str, *,
                 max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> tuple[grpc.Server, int]:
    """Start serving on ``listen`` (``host:port``; port 0 picks one). Returns the server and its port. Every
    client may have a call waiting for its turn or round, so there is a handler thread per client and spare."""
    threads = 2 * service.clients + 4
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=channel_options(max_message_mib))
    server.add_generic_rpc_handlers((generic_handler(service.hello, service.handshake, service.exchange),))
    port = server.add_secure_port(listen, server_credentials(identity))
    if port == 0:
        raise ProtocolError(f"cannot listen on {listen}: address in use or not valid")
    server.start()
    return server, port
