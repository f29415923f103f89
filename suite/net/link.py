"""The client↔server link across processes: gRPC over TLS 1.3 with mutual authentication.

Three unary methods under ``/splitleak.v1.Split/``, each moving raw bytes (no protobuf, no pickle):

* ``Hello`` — JSON both ways: the client names the experiment it was built for (a hash of the config);
  the server answers with its strategy and the public half of the application-level channel (session id,
  key-exchange mode, public key) plus a fresh one-time challenge (server nonce) for the next handshake.
  TLS has authenticated the server, so that key is authentic.
* ``Handshake`` — the client's AEAD handshake frame (``suite.engine.channel.ClientEnd``), answering the challenge;
  a replayed one is refused (``suite.engine.channel.ServerEnd.accept``).
* ``Exchange`` — one round trip of the split protocol: an encrypted ``ActivationMsg`` or ``GradientMsg``
  (the in-process byte encoding, sealed with AES-256-GCM) in, the server's encrypted reply out.
* ``Reveal`` — the integrity audit's reveal (``defenses.integrity_audit``): a sealed ``reveal_request`` for a
  step whose reply the server has already committed to, answered by a sealed ``reveal`` carrying the trunk
  state of that commitment (``suite.engine.protocol.encode_control``). Same channel, same counters.

The AEAD channel runs inside TLS, so a TLS-terminating proxy or a peer client sees only ciphertext of a
key it does not hold. The server takes each client's identity from its certificate, never from the message.
Message sizes are capped explicitly on both sides (``max_message_mib``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc

from suite.engine.channel import ClientEnd, IntegrityError
from suite.engine.protocol import REVEAL as REVEAL_KIND
from suite.engine.protocol import REVEAL_REQUEST, decode_control, encode_control, peek
from suite.engine.transport import SERVER, Tapped
from suite.errors import ProtocolError, SplitleakError
from suite.net.certs import Identity
from suite.net.defended import described_label, key_exchange

SERVICE = "splitleak.v1.Split"
HELLO, HANDSHAKE, EXCHANGE, REVEAL = (f"/{SERVICE}/{m}" for m in ("Hello", "Handshake", "Exchange", "Reveal"))
DEFAULT_MAX_MESSAGE_MIB = 256
# A client's channel tries a server that was down again within a second (gRPC's default backoff grows to 120 s).
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
              ("grpc.max_reconnect_backoff_ms", 1000)]


def channel_options(max_message_mib: int) -> list[tuple[str, int]]:
    limit = int(max_message_mib * 1024 * 1024)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class LinkError(SplitleakError):
    """The server refused a call or cannot be reached; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, transient: bool, code: str | None = None):
        super().__init__(message)
        self.transient = transient
        self.code = code  # the gRPC status code's name, when the server answered with one


_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


@dataclass
class Link:
    """A client's mutually authenticated gRPC channel to the server."""

    address: str
    identity: Identity
    max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB
    timeout: float = 120.0  # seconds one call may take (a serial server may make a client wait its turn)
    peer_name: str | None = None  # the name the server's certificate must hold (a stage checks its neighbour's)

    def __post_init__(self) -> None:
        self.credentials = grpc.ssl_channel_credentials(root_certificates=self.identity.ca,
                                                        private_key=self.identity.key,
                                                        certificate_chain=self.identity.cert)
        self._open()

    def _open(self) -> None:
        """A fresh channel (a new TCP connection and TLS handshake on the next call)."""
        peer = [("grpc.ssl_target_name_override", self.peer_name)] if self.peer_name else []
        self.channel = grpc.secure_channel(self.address, self.credentials,
                                           options=channel_options(self.max_message_mib) + _RECONNECT + peer)
        self._calls = {m: self.channel.unary_unary(m) for m in (HELLO, HANDSHAKE, EXCHANGE, REVEAL)}

    def _error(self, method: str, err: grpc.RpcError) -> LinkError:
        code, detail = err.code(), (err.details() or "").strip().splitlines()
        return LinkError(f"{method.rsplit('/', 1)[-1]} to {self.address} failed: {code.name}"
                         f"{': ' + detail[0] if detail else ''}", transient=code in _TRANSIENT, code=code.name)

    def call(self, method: str, data: bytes, timeout: float | None = None) -> bytes:
        timeout = self.timeout if timeout is None else timeout
        if method == HELLO:
            return self._hello(data, timeout)
        try:
            return self._calls[method](data, timeout=timeout)
        except grpc.RpcError as err:
            raise self._error(method, err) from None

    def _hello(self, data: bytes, timeout: float) -> bytes:
        """Hello, retried for up to ``timeout`` seconds while the server cannot be reached (not up yet), but
        a TLS handshake that fails is one clear, final line at once: the server refused this client's
        certificate (it closed two fresh handshakes in a row: a certificate from another CA, or none), or
        this client does not accept the server's (another CA, another host name, not TLS at all)."""
        deadline = time.monotonic() + timeout
        closed = 0
        while True:
            try:
                return self._calls[HELLO](data, timeout=max(0.1, deadline - time.monotonic()))
            except grpc.RpcError as err:
                problem = _tls_problem(err)
                if problem == "closed":
                    closed += 1
                    if closed >= 2:
                        raise LinkError(f"Hello to {self.address} failed: the server refused this client's "
                                        "certificate (it closed the TLS handshake): use the certificate the "
                                        "server's CA signed for this client, --certs DIR/client-<i> of the "
                                        "`splitleak certs DIR` that made the server's", transient=False) from None
                    self.channel.close()
                    self._open()  # a fresh handshake: one closed connection may be chance (a server restarting)
                    continue
                closed = 0
                if problem is not None:
                    raise LinkError(f"Hello to {self.address} failed: the TLS handshake failed on this side "
                                    f"({problem}): this client does not accept the server's certificate, or "
                                    f"{self.address} does not speak TLS; use the ca.pem of the `splitleak certs "
                                    "DIR` that made the server's certificate (--certs DIR/client-<i>) and check "
                                    "the address", transient=False) from None
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                    raise self._error(HELLO, err) from None
                time.sleep(0.2)  # not reachable (yet): try again

    def close(self) -> None:
        self.channel.close()


class RemoteTransport(Tapped):
    """The ``Transport`` a client talks through when the server is another process. ``send`` seals the
    frame and holds it; the matching ``recv`` makes the call and opens the reply. Taps see what crosses the
    wire inside TLS: sealed frames."""

    def __init__(self, link: Link, client_id: int, config_hash: str, defense: dict | None = None):
        super().__init__()
        self.link = link
        self.client_id = client_id
        self.config_hash = config_hash
        # The agreed defense (``suite.net.defended.describe``): named in Hello so that a mismatch is reported
        # by name; the hash, which covers it, is what the server checks.
        self.defense = defense or {"name": "none", "params": {}}
        self.endpoint = f"client/{client_id}"
        self.end: ClientEnd | None = None
        self.server_info: dict = {}
        self._out: bytes | None = None
        self._stale: str | None = None  # why the channel must be renewed before the next message

    def connect(self, hello_timeout: float = 60.0) -> dict:
        """Hello and a fresh AEAD channel (also after a server restart: a new session, new keys)."""
        request = json.dumps({"client_id": self.client_id, "config": self.config_hash,
                              "defense": described_label(self.defense)}).encode()
        self.server_info = json.loads(self.link.call(HELLO, request, timeout=hello_timeout))
        wanted = key_exchange(self.defense)
        if self.server_info.get("mode") != wanted:
            raise LinkError(f"the server offers key exchange {self.server_info.get('mode')!r}, but the agreed "
                            f"defense needs {wanted!r}: start both with the same --defense", transient=False)
        self.end = ClientEnd(self.endpoint, self.server_info)
        self.link.call(HANDSHAKE, self.end.handshake)
        self._stale = None
        self._out = None
        return self.server_info

    def send(self, src: str, dst: str, data: bytes) -> None:
        if self.end is None:
            raise SplitleakError("the client is not connected: call connect() first")
        if self._stale:  # a reveal failed before the server read it: the channel's counters may disagree
            raise LinkError(f"reconnecting: {self._stale}", transient=True)
        if self._out is not None:
            raise SplitleakError("a remote client sends one message per call; the previous one was not answered")
        self._out = self.end.seal(bytes(data))
        self._show(src, dst, self._out)
        self.bytes_sent += len(self._out)

    def recv(self, dst: str, src: str) -> bytes:
        if self._out is None:
            raise SplitleakError(f"{dst} expected a reply from {src} but sent nothing")
        out, self._out = self._out, None
        reply = self.link.call(EXCHANGE, out)
        self._show(SERVER, dst, reply)
        return self.end.open(reply)


    def reveal(self, client_id: int, step: int) -> bytes:
        """The trunk state the server committed to in ``step``'s reply (the audit's reveal request, sealed on
        this client's channel). A refusal, a broken link or a reply that is not that step's reveal raises
        ``ProtocolError``: the audit flags the step."""
        if self.end is None:
            raise ProtocolError("the client is not connected: no reveal can be requested")
        if self._out is not None:
            raise ProtocolError("a reveal request cannot cross a message that awaits its reply")
        request = self.end.seal(encode_control(REVEAL_REQUEST, client_id, step))
        try:
            reply = self.end.open(self.link.call(REVEAL, request))
        except (LinkError, IntegrityError) as err:
            if not (isinstance(err, LinkError) and err.code == "NOT_FOUND"):  # refused after reading: in step
                self._stale = f"a reveal failed ({err})"
            raise ProtocolError(f"no reveal for step {step}: {err}") from None
        cid, got, payload = decode_control(reply, REVEAL_KIND)
        if (cid, got) != (client_id, step):
            raise ProtocolError(f"asked the reveal of client {client_id} step {step}, got client {cid} step {got}")
        return payload


def _tls_problem(err: grpc.RpcError) -> str | None:
    """Why a call never got past TLS: "closed" when the server hung up during the handshake (what it does to
    a client certificate it refuses), the reason when this side's handshake failed, None otherwise (the
    server is not reachable, or the call got through)."""
    detail = err.details() or ""
    if err.code() != grpc.StatusCode.UNAVAILABLE or "failed to connect" not in detail:
        return None
    if detail.rstrip().endswith("Socket closed"):
        return "closed"
    low = detail.lower()
    if "hostname verification" in low:  # a stage's neighbour check (``peer_name``), or a host not in the certificate
        return "the peer's certificate does not name the expected host or stage"
    if "handshake failed" in low or "ssl_error" in low or "certificate" in low:
        found = re.search(r"OPENSSL_internal:([A-Z0-9_]+)", detail)
        return found.group(1) if found else "TLS handshake failed"
    return None


def frame_kind(data: bytes) -> str:
    """The message kind of a plaintext frame (for logging and routing)."""
    return peek(data)[0]


Handler = Callable[[bytes, grpc.ServicerContext], bytes]


def generic_handler(hello: Handler, handshake: Handler, exchange: Handler,
                    reveal: Handler | None = None) -> grpc.GenericRpcHandler:
    """The service with raw-bytes methods (no serializers: requests and replies are ``bytes``)."""
    methods = {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Handshake": grpc.unary_unary_rpc_method_handler(handshake),
        "Exchange": grpc.unary_unary_rpc_method_handler(exchange),
    }
    if reveal is not None:
        methods["Reveal"] = grpc.unary_unary_rpc_method_handler(reveal)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def caller_name(context: grpc.ServicerContext, what: str) -> str:
    """The common name on the caller's certificate, once its call is known to run over TLS 1.3; any other
    version is refused here (gRPC Python has no minimum-version setting: a TLS 1.2 handshake completes, but
    no call on it is served). ``what`` names the service in the refusal ("this server", "this stage")."""
    auth = context.auth_context()
    version = (auth.get("ssl_tls_version") or [b"?"])[0].decode(errors="replace")
    if version != "TLSv1.3":
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what} requires TLS 1.3; the connection negotiated "
                      f"{version}")
    names = auth.get("x509_common_name") or []
    return names[0].decode() if names else ""


def start_tls_server(handler: grpc.GenericRpcHandler, identity: Identity, listen: str, threads: int,
          max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> tuple[grpc.Server, int]:
    """Serve ``handler`` over mutual TLS on ``listen`` (``host:port``; port 0 picks one) with ``threads``
    handler threads; returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=channel_options(max_message_mib))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(listen, server_credentials(identity))
    if port == 0:
        raise SplitleakError(f"cannot listen on {listen}: address in use or not valid")
    server.start()
    return server, port


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """TLS with client authentication required: a client without a certificate signed by the CA never
    gets past the handshake. gRPC Python offers no minimum TLS version, so BoringSSL still completes a TLS 1.2
    handshake; the service refuses every call whose negotiated version (``ssl_tls_version`` in the auth
    context) is not TLS 1.3 (``caller_name``)."""
    return grpc.ssl_server_credentials([(identity.key, identity.cert)], root_certificates=identity.ca,
                                       require_client_auth=True)
