"""Pipeline stages as processes: ``splitleak serve --stage i`` (``[training] stages = S`` > 1).

Each stage of ``suite.engine.stages`` runs in its own process over its own blocks, with its own optimiser(s)
and checkpoint, and speaks gRPC + mutual TLS (``suite.net.link``) to its neighbours only:

* The clients talk to stage 0 exactly as to a server (``suite.net.server.SplitService``, identity
  ``stage-0``): same Hello, channel, strategies, turns, rounds and bounds.
* Stage i calls stage i+1 (identity ``stage-i``; the TLS handshake checks that the peer's certificate names
  ``stage-<i+1>``), and stage i+1 serves no one but ``stage-i`` (``StageService._who``). Each link has its
  own AEAD channel inside TLS (``suite.engine.channel``), keyed by its own handshake.
* One pass crosses a link as one sealed ``stage_pass`` control frame holding every client's protocol frame
  of the pass (``pack_frames``: a ``batch_parallel`` pass stays one trunk pass at every stage), answered by
  one ``stage_reply``. Forward: stage i runs its blocks (``Server.forward``, the one protocol step of
  ``suite.engine.step`` as the clients drive it) and passes its outputs down; the last stage's replies to
  the clients (the hidden states for the tails) travel back up to stage 0, which answers the clients.
  Backward: the tails' gradients travel down to the last stage; each stage backpropagates, steps, and
  passes the gradient of its input up. So, unlike in one process, the tails' traffic is relayed by every
  stage (each link seals it separately: a stage reads it in clear). Every stage sees what the last one sees
  of the tails.

Defenses. Every stage installs the server part of the run's defense on its own ``Server``
(``Defense.install_server``): under ``dp_sgd`` each stage clips and noises its own trunk adapters' per-example
gradients, each pass averaged over its own rows, and the clients' epsilon counts every stage;
``integrity_audit`` (one server's commitments) is refused with stages.

Crash-resume. Every stage checkpoints after each pass it completes (weights, optimiser state, and the last
pass's requests' digests and replies). A stage whose downstream call fails retries it (a fresh connection
and channel) for ``give_up_after`` seconds per stage after it, and waits on one call for longer than the next
stage may hold it (``stage_windows``: the windows nest, so a failure is retried where it happened); a
retried backward first replays the pass's forward, so that a restarted stage has the pass pending again. A stage that receives a pass it has already completed (the same
bytes: it stepped and checkpointed, but its reply was lost) answers from its checkpoint without stepping
again. So a stage killed at any moment (``kill -9``) and restarted from its checkpoint leaves the run exactly
where an uninterrupted one would be (``tests/test_net_stages.py``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import torch

from suite.engine.channel import ClientEnd, IntegrityError, ServerEnd, ServerKeys
from suite.engine.parties import Server, UpdateRefused
from suite.engine.protocol import STAGE_PASS, STAGE_REPLY, Bounds, decode_control, encode_control, peek
from suite.engine.stages import NoOutputCommitments, stage_endpoint
from suite.engine.transport import SERVER, InProcessTransport, client_endpoint
from suite.errors import ConfigError, ProtocolError, SplitleakError
from suite.experiment.config import ExperimentConfig
from suite.net import checkpoint
from suite.net.certs import Identity, load_identity, stage_name
from suite.net.link import (
    DEFAULT_MAX_MESSAGE_MIB,
    EXCHANGE,
    HANDSHAKE,
    HELLO,
    Link,
    LinkError,
    caller_name,
    generic_handler,
    start_tls_server,
)

_LEN = struct.Struct(">I")


# --- one pass's frames in one message -------------------------------------------------------------------

def pack_frames(entries: Sequence[tuple[int, bytes | str]]) -> bytes:
    """``(client id, protocol frame)`` per client of a pass, or ``(client id, why)`` for a client a stage
    refused (its update would have made a value non-finite): a JSON index, then the frames."""
    index = [{"client": c, "len": len(x)} if isinstance(x, bytes) else {"client": c, "refused": x} for c, x in entries]
    head = json.dumps(index).encode()
    return _LEN.pack(len(head)) + head + b"".join(x for _, x in entries if isinstance(x, bytes))


def unpack_frames(data: bytes) -> list[tuple[int, bytes | str]]:
    """The inverse of ``pack_frames``; anything malformed is a ``ProtocolError``."""
    try:
        (n,) = _LEN.unpack_from(data)
        index = json.loads(data[_LEN.size:_LEN.size + n])
        out, at = [], _LEN.size + n
        for e in index:
            c = e["client"]
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"client {c!r}")
            if "refused" in e:
                out.append((c, str(e["refused"])))
                continue
            length = e["len"]
            if not isinstance(length, int) or length < 0 or at + length > len(data):
                raise ValueError("frame length")
            out.append((c, bytes(data[at:at + length])))
            at += length
        if at != len(data) or len({c for c, _ in out}) != len(out):
            raise ValueError("trailing bytes or a client twice")
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise ProtocolError(f"malformed stage frame bundle ({err})") from None
    return out


def _steps(step: int | Mapping[int, int], ids: Sequence[int]) -> dict[int, int]:
    return dict(step) if isinstance(step, Mapping) else dict.fromkeys(ids, step)


# --- the link to the next stage -------------------------------------------------------------------------

class StageLink:
    """Stage ``index``'s calls to stage ``index + 1``: Hello, a fresh AEAD channel, then one ``stage_pass``
    per call, retried across a restart of the next stage (see the module docstring)."""

    def __init__(self, address: str, identity: Identity, index: int, config_hash: str, *,
                 give_up_after: float = 120.0, call_timeout: float = 120.0,
                 max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB):
        self.link = Link(address, identity, max_message_mib=max_message_mib, timeout=call_timeout,
                         peer_name=stage_name(index + 1))
        self.index, self.config_hash, self.give_up_after = index, config_hash, give_up_after
        self.end: ClientEnd | None = None
        self.last_forward: bytes | None = None  # the pending pass's forward, replayed before a retried backward
        self.retries = 0

    def connect(self, within: float | None = None) -> None:
        request = json.dumps({"stage": self.index, "config": self.config_hash}).encode()
        within = self.give_up_after if within is None else within
        info = json.loads(self.link.call(HELLO, request, timeout=max(0.1, within)))
        end = ClientEnd(stage_endpoint(self.index), info)
        self.link.call(HANDSHAKE, end.handshake)
        self.end = end

    def _exchange(self, plain: bytes, left: float | None) -> bytes:
        timeout = None if left is None else max(0.1, min(self.link.timeout, left))
        return self.end.open(self.link.call(EXCHANGE, self.end.seal(plain), timeout=timeout))

    def call(self, plain: bytes, forward: bool) -> bytes:
        """One pass to the next stage and its reply. The first try may take the link's call deadline; once a
        try fails, the retries (each cut to what is left) go on for ``give_up_after`` seconds, no longer. So
        this call holds its caller for at most the call deadline plus ``give_up_after`` (``stage_windows``)."""
        deadline = None  # from the first failure
        replay = False
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if self.end is None:
                    self.connect(left)
                if replay:
                    self._exchange(self.last_forward, left)
                reply = self._exchange(plain, left)
                break
            except LinkError as err:
                now = time.monotonic()
                deadline = now + self.give_up_after if deadline is None else deadline
                if not err.transient or now >= deadline:
                    raise ProtocolError(f"stage {self.index + 1} failed: {err}") from None
                self.end, self.retries = None, self.retries + 1
                replay = not forward and self.last_forward is not None
                time.sleep(0.2)
        if forward:
            self.last_forward = plain
        return reply

    def close(self) -> None:
        self.link.close()


# --- one stage: its Server, and the next stage across the network ---------------------------------------

class StageNode(NoOutputCommitments):
    """Stage ``index``'s ``Server`` with the stages after it behind ``link`` (None: it is the last). What
    ``SplitService`` asks of "the server" at stage 0, and what ``StageService`` drives at the others. Its
    transport is this process's queue: the clients' frames under ``client/<c>`` <-> ``server`` (what stage 0
    answers, what the last stage takes), the neighbours' under ``stage/<i>``."""

    def __init__(self, server: Server, index: int, stages: int, link: StageLink | None):
        if (link is None) != (index == stages - 1):
            raise ConfigError(f"stage {index} of {stages} needs a link to the next stage exactly when it is not "
                              "the last")
        self.server, self.index, self.stage_count, self.link = server, index, stages, link
        self._steps: dict[int, int] = {}
        self.transport = InProcessTransport()

    @property
    def transport(self):
        return self.server.transport

    @transport.setter
    def transport(self, value) -> None:
        self.server.transport = value

    @property
    def stages(self) -> list[Server]:
        """The ``Server`` parties this process runs: its own stage only (what a defense's server part
        installs on, like ``StageChain.stages`` in one process)."""
        return [self.server]

    # what SplitService reads and sets
    trunk = property(lambda self: self.server.trunk)
    optimizers = property(lambda self: self.server.optimizers)
    optimizer_steps = property(lambda self: self.server.optimizer_steps)
    adapters = property(lambda self: self.server.adapters)
    device = property(lambda self: self.server.device)
    pending_clients = property(lambda self: self.server.pending_clients)

    @property
    def bounds(self) -> Bounds:
        return self.server.bounds

    @bounds.setter
    def bounds(self, value: Bounds) -> None:
        self.server.bounds = value

    def expect(self, shape=None, kind=None):
        return self.server.expect(shape, kind)

    def discard_pending(self) -> None:
        self.server.discard_pending()

    def forward(self, client_ids: Sequence[int], step: int | Mapping[int, int]) -> None:
        """This stage's blocks over the pass's activations (queued from upstream), then the stages after it;
        afterwards the clients' hidden states are queued ``server`` -> ``client/<c>``."""
        ids = list(client_ids)
        self._steps = _steps(step, ids)
        self.server.forward(ids, self._steps)
        if self.link is None:
            return
        q, me, down = self.transport, self.server.name, self.server.down
        frames = [(c, q.recv(down, me)) for c in ids]
        reply = self.link.call(encode_control(STAGE_PASS, ids[0], self._steps[ids[0]], pack_frames(frames)), True)
        for c, frame in _reply_entries(reply, ids, self.index + 1):
            if isinstance(frame, str):
                raise ProtocolError(f"stage {self.index + 1} refused client {c}'s forward pass: {frame}")
            q.send(SERVER, client_endpoint(c), frame)

    def backward(self, step: int | None = None, skip: Mapping[int, str] | None = None) -> None:
        """The tails' gradients (queued ``client/<c>`` -> ``server``) go down to the last stage; this stage
        backpropagates what comes back; afterwards the gradients of its input are queued upstream."""
        ids = self.server.pending_clients
        if not ids:
            raise ProtocolError(f"stage {self.index}: a backward pass without a pending forward pass")
        skip = dict(skip or {})
        if self.link is not None:
            q, me, down = self.transport, self.server.name, self.server.down
            frames = [(c, q.recv(SERVER, client_endpoint(c))) for c in ids]
            reply = self.link.call(encode_control(STAGE_PASS, ids[0], self._steps[ids[0]], pack_frames(frames)), False)
            for c, frame in _reply_entries(reply, ids, self.index + 1):
                if isinstance(frame, str):
                    skip.setdefault(c, frame)
                else:
                    q.send(down, me, frame)
        self.server.backward(step, skip=skip)


def _reply_entries(reply: bytes, ids: list[int], stage: int) -> list[tuple[int, bytes | str]]:
    _, _, payload = decode_control(reply, STAGE_REPLY)
    entries = unpack_frames(payload)
    if [c for c, _ in entries] != ids:
        raise ProtocolError(f"stage {stage} answered for clients {[c for c, _ in entries]}, not {ids}")
    return entries


# --- the service stages 1..S-1 run for their upstream neighbour ------------------------------------------

class _NoPendingPass(ProtocolError):
    """A backward pass for a forward pass this stage does not hold (it restarted): the caller replays it."""


def _blob(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class StageService:
    """The gRPC side of stage ``index`` > 0: it accepts ``stage-<index-1>`` only, opens its passes, runs them
    through its ``StageNode`` and checkpoints after each completed pass (see the module docstring)."""

    def __init__(self, node: StageNode, config_hash: str, *, key_exchange: str = "x25519",
                 checkpoint_path: str | Path | None = None):
        if node.index < 1:
            raise ConfigError("stage 0 serves the clients (suite.net.server.SplitService), not a stage")
        self.node, self.index, self.config_hash = node, node.index, config_hash
        self.upstream = stage_name(node.index - 1)
        self.peer = stage_endpoint(node.index - 1)
        self.end = ServerEnd(ServerKeys(key_exchange))
        self.lock = threading.Lock()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.cache: dict[str, bytes] = {}  # the last completed pass: its requests' digests and its replies
        self._forward: tuple[bytes, bytes] | None = None  # the pending pass: its forward's digest and reply
        self._replaying = False
        self.passes = 0
        self.replays = 0
        self.events: list[str] = []
        self._restore()

    def _who(self, context: grpc.ServicerContext) -> None:
        name = caller_name(context, "this stage")
        if name != self.upstream:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate {name!r} is not this stage's upstream "
                          f"neighbour ({self.upstream}): stage {self.index} serves no one else")

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._who(context)
        try:
            asked = json.loads(request)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello expects JSON")
        if asked.get("stage") != self.index - 1:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"caller claims stage {asked.get('stage')} but its "
                          f"certificate is {self.upstream}")
        if asked.get("config") != self.config_hash:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stages were started with different experiment "
                          "configs (model, split, data, training, stages, defense): start every stage from the "
                          "same config file and flags")
        with self.lock:
            public = self.end.public_for(self.peer)
        return json.dumps({**public, "stage": self.index}).encode()

    def handshake(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._who(context)
        with self.lock:
            try:
                self.end.accept(self.peer, request)
            except IntegrityError as err:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        return b""

    def exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._who(context)
        with self.lock:
            if self.peer not in self.end.channels:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no secure channel with this stage: say Hello again")
            try:
                plain = self.end.open(self.peer, request)
            except IntegrityError as err:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
            try:
                reply = self.run_pass(plain)
            except _NoPendingPass as err:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
            except ProtocolError as err:
                self.node.discard_pending()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stage {self.index}: {err}")
            return self.end.seal(self.peer, reply)

    def run_pass(self, plain: bytes) -> bytes:
        """One opened ``stage_pass``: a forward or a backward pass of this stage and the ones after it."""
        _, step, payload = decode_control(plain, STAGE_PASS)
        entries = unpack_frames(payload)
        if not entries or any(isinstance(f, str) for _, f in entries):
            raise ProtocolError("a stage pass must carry one frame per client")
        kinds = {peek(f)[0] for _, f in entries}
        if kinds not in ({"activation"}, {"gradient"}):
            raise ProtocolError(f"a stage pass carries activations or gradients, not {sorted(kinds)}")
        digest = hashlib.sha256(plain).digest()
        ids = [c for c, _ in entries]
        q, me = self.node.transport, self.node.server.name
        if kinds == {"activation"}:
            if self.cache.get("forward") == digest:  # completed before (its reply was lost): answer it again
                self._replaying = True
                self.replays += 1
                self.events.append(f"replayed the forward pass of clients {ids} step {step} from the checkpoint")
                return self.cache["forward_reply"]
            self._replaying = False
            self.node.discard_pending()
            q._queues.clear()  # whatever a broken pass left
            for _, frame in entries:
                q.send(self.peer, me, frame)
            self.node.forward(ids, {c: peek(f)[1].get("step") for c, f in entries})
            reply = encode_control(STAGE_REPLY, ids[0], step,
                                   pack_frames([(c, q.recv(client_endpoint(c), SERVER)) for c in ids]))
            self._forward = (digest, reply)
            return reply
        if self._replaying and self.cache.get("backward") == digest:
            self.replays += 1
            return self.cache["backward_reply"]
        if self._forward is None or self.node.pending_clients != ids:
            raise _NoPendingPass(f"stage {self.index} holds no forward pass for clients {ids} (it restarted?): "
                                 "replay the forward first")
        for c, frame in entries:
            q.send(client_endpoint(c), SERVER, frame)
        refused: dict[int, str] = {}
        try:
            self.node.backward()
        except UpdateRefused as err:
            refused = err.clients
        reply = encode_control(STAGE_REPLY, ids[0], step, pack_frames(
            [(c, f"stage {self.index}: {refused[c]}" if c in refused else q.recv(self.peer, me)) for c in ids]))
        self.cache = {"forward": self._forward[0], "forward_reply": self._forward[1], "backward": digest,
                      "backward_reply": reply}
        self._forward = None
        self.passes += 1
        self.save()
        return reply

    # --- checkpoints ---------------------------------------------------------------------------------

    def save(self) -> None:
        if self.checkpoint_path is None:
            return
        server = self.node.server
        checkpoint.save(self.checkpoint_path, {
            "config": self.config_hash,
            **checkpoint.party_state(server.trunk, server.optimizers),
            "passes": self.passes,
            "cache": {k: _blob(v) for k, v in self.cache.items()},
        })

    def _restore(self) -> None:
        if self.checkpoint_path is None:
            return
        state = checkpoint.load(self.checkpoint_path)
        if state is None:
            return
        if state["config"] != self.config_hash:
            raise SplitleakError(f"stage checkpoint {self.checkpoint_path} belongs to another config; delete it or "
                                 "point --checkpoint elsewhere")
        server = self.node.server
        checkpoint.load_party(server.trunk, server.optimizers, state)
        self.passes = int(state["passes"])
        self.cache = {k: bytes(v.numpy().tobytes()) for k, v in state["cache"].items()}
        self.events.append(f"restored from {self.checkpoint_path} after {self.passes} passes")


def start_stage_server(service: StageService, identity: Identity, listen: str, *,
                       max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> tuple[grpc.Server, int]:
    """Serve stage ``service.index`` on ``listen`` (port 0 picks one); returns the server and its port."""
    return start_tls_server(generic_handler(service.hello, service.handshake, service.exchange), identity, listen,
                            threads=4, max_message_mib=max_message_mib)


# --- `splitleak serve --stage i` -------------------------------------------------------------------------

def check_stage(cfg: ExperimentConfig, index: int, next_address: str | None) -> None:
    stages = cfg.training.stages
    if stages < 2:
        raise SplitleakError("--stage needs training.stages >= 2: pass --stages S or set [training] stages")
    if not 0 <= index < stages:
        raise SplitleakError(f"--stage {index} is not a stage of this config (it has {stages}: 0..{stages - 1})")
    if index < stages - 1 and not next_address:
        raise SplitleakError(f"stage {index} needs --next HOST:PORT, the address of stage {index + 1}")
    if index == stages - 1 and next_address:
        raise SplitleakError(f"stage {index} is the last stage: it has no --next")


def stage_windows(index: int, stages: int, give_up_after: float, call_timeout: float) -> tuple[float, float]:
    """Stage ``index``'s retry window and its deadline for one call on its link to stage ``index + 1``. They
    nest, so that a failure deep in the chain is retried where it happened, not given up on by every stage
    at once. Stage ``index + 1`` holds a call for at most its own compute (``call_timeout`` allows for it)
    plus its own link's call deadline and retry window (``StageLink.call``), so stage ``index`` waits on one
    call for all of that, and retries for ``give_up_after`` per stage after it. With ``a`` stages after it:
    window ``a x give_up_after``, call ``a x call_timeout + a(a - 1)/2 x give_up_after`` (the last-but-one
    stage: ``give_up_after`` and ``call_timeout``)."""
    after = stages - 1 - index
    if after < 1:
        raise ConfigError(f"stage {index} of {stages} is the last: it calls no stage")
    return after * give_up_after, after * call_timeout + after * (after - 1) / 2 * give_up_after


def stage_factory(cfg: ExperimentConfig, index: int, identity: Identity, next_address: str | None, defense, *,
                  give_up_after: float = 120.0, call_timeout: float = 120.0,
                  max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> Callable[[object], StageNode]:
    """``prepared -> StageNode``: stage ``index`` of the prepared run's ``StageChain``, with its link to the
    next stage (whose config hash covers the stage layout). ``give_up_after`` / ``call_timeout``: the last
    link's retry window and call deadline; earlier links' nest around them (``stage_windows``)."""
    from suite.net.parties import config_hash, stage_layout

    def make(prepared) -> StageNode:
        chain = prepared.session.server
        link = None
        if next_address:
            digest = config_hash(cfg, defense, stage_layout(cfg, prepared.session.split))
            window, deadline = stage_windows(index, cfg.training.stages, give_up_after, call_timeout)
            link = StageLink(next_address, identity, index, digest, give_up_after=window, call_timeout=deadline,
                             max_message_mib=max_message_mib)
        return StageNode(chain.stages[index], index, cfg.training.stages, link)

    return make


def build_stage_service(cfg: ExperimentConfig, index: int, identity: Identity, next_address: str | None,
                        checkpoint_dir: str | Path | None = None, *, defense=None, give_up_after: float = 120.0,
                        call_timeout: float = 120.0, max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB
                        ) -> StageService:
    """The service of stage ``index`` > 0; every message from the stage before it is bounded in rows (the
    batch size) and length (``max_length``)."""
    from suite.net.defended import choose_defense, describe, key_exchange
    from suite.net.parties import _prepare, config_hash, stage_layout

    check_stage(cfg, index, next_address)
    defense = choose_defense(cfg) if defense is None else defense
    prepared = _prepare(cfg)
    node = stage_factory(cfg, index, identity, next_address, defense, give_up_after=give_up_after,
                         call_timeout=call_timeout, max_message_mib=max_message_mib)(prepared)
    node.bounds = Bounds(rows=cfg.training.batch_size, length=cfg.data.max_length)
    # The defense's server part on this stage's own trunk (dp_sgd: its adapters under DP-SGD, each pass
    # averaged over its own rows, as on stage 0; integrity_audit refuses: its commitments need one server),
    # before the checkpoint restores the optimiser state.
    defense.install_server(node)
    path = Path(checkpoint_dir) / f"{stage_name(index)}.pt" if checkpoint_dir else None
    return StageService(node, config_hash(cfg, defense, stage_layout(cfg, prepared.session.split)),
                        key_exchange=key_exchange(describe(defense)), checkpoint_path=path)


def serve_stage(cfg: ExperimentConfig, index: int, certs: str | Path, listen: str, next_address: str | None,
                checkpoint_dir: str | Path | None = None, *, max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB,
                on_ready: Callable[[int, list[str]], None] | None = None, defense=None,
                give_up_after: float = 120.0, **timeouts) -> None:
    """Serve stage ``index`` until interrupted: stage 0 serves the clients (``suite.net.parties.serve``
    with this stage as its server), the others their upstream neighbour."""
    from suite.net.defended import choose_defense
    from suite.net.parties import refuse_unsafe_seeds, serve, serve_until_stopped

    check_stage(cfg, index, next_address)
    refuse_unsafe_seeds(cfg)
    defense = choose_defense(cfg) if defense is None else defense
    identity = load_identity(certs, stage_name(index))
    if index == 0:
        make = stage_factory(cfg, 0, identity, next_address, defense, give_up_after=give_up_after,
                             max_message_mib=max_message_mib)
        made: list[StageNode] = []

        def keep(prepared) -> StageNode:
            made.append(make(prepared))
            return made[-1]

        try:
            serve(cfg, certs, listen, checkpoint_dir, max_message_mib=max_message_mib, on_ready=on_ready,
                  defense=defense, stage=keep, **timeouts)
        finally:  # its channel to stage 1
            for node in made:
                if node.link is not None:
                    node.link.close()
        return
    service = build_stage_service(cfg, index, identity, next_address, checkpoint_dir, defense=defense,
                                  give_up_after=give_up_after, max_message_mib=max_message_mib)
    server, port = start_stage_server(service, identity, listen, max_message_mib=max_message_mib)
    try:
        serve_until_stopped(server, port, service.events, on_ready)
    finally:
        if service.node.link is not None:
            service.node.link.close()
