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

The AEAD channel runs inside TLS, so a TLS-terminating proxy or a peer client sees only ciphertext of a
key it does not hold. The server takes each client's identity from its certificate, never from the message.
Message sizes are capped explicitly on both sides (``max_message_mib``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from suite.engine.channel import ClientEnd
from suite.engine.protocol import peek
from suite.engine.transport import SERVER, Tapped
from suite.errors import SplitleakError
from suite.net.certs import Identity

SERVICE = "splitleak.v1.Split"
HELLO, HANDSHAKE, EXCHANGE = (f"/{SERVICE}/{m}" for m in ("Hello", "Handshake", "Exchange"))
DEFAULT_MAX_MESSAGE_MIB = 256


def channel_options(max_message_mib: int) -> list[tuple[str, int]]:
    limit = int(max_message_mib * 1024 * 1024)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class LinkError(SplitleakError):
    """The server refused a call or cannot be reached; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}


@dataclass
class Link:
    """A client's mutually authenticated gRPC channel to the server."""

    address: str
    identity: Identity
    max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB
    timeout: float = 120.0  # seconds one call may take (a serial server may make a client wait its turn)

    def __post_init__(self) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=self.identity.ca, private_key=self.identity.key,
                                             certificate_chain=self.identity.cert)
        self.channel = grpc.secure_channel(self.address, creds, options=channel_options(self.max_message_mib))
        self._calls = {m: self.channel.unary_unary(m) for m in (HELLO, HANDSHAKE, EXCHANGE)}

    def call(self, method: str, data: bytes, timeout: float | None = None) -> bytes:
        try:
            return self._calls[method](data, timeout=self.timeout if timeout is None else timeout,
                                       wait_for_ready=method == HELLO)
        except grpc.RpcError as err:
            code, detail = err.code(), (err.details() or "").strip().splitlines()
            raise LinkError(f"{method.rsplit('/', 1)[-1]} to {self.address} failed: {code.name}"
                            f"{': ' + detail[0] if detail else ''}", transient=code in _TRANSIENT) from None

    def close(self) -> None:
        self.channel.close()


class RemoteTransport(Tapped):
    """The ``Transport`` a client talks through when the server is another process. ``send`` seals the
    frame and holds it; the matching ``recv`` makes the call and opens the reply. Taps see what crosses the
    wire inside TLS: sealed frames."""

    def __init__(self, link: Link, client_id: int, config_hash: str):
        super().__init__()
        self.link = link
        self.client_id = client_id
        self.config_hash = config_hash
        self.endpoint = f"client/{client_id}"
        self.end: ClientEnd | None = None
        self.server_info: dict = {}
        self._out: bytes | None = None

    def connect(self, hello_timeout: float = 60.0) -> dict:
        """Hello and a fresh AEAD channel (also after a server restart: a new session, new keys)."""
        request = json.dumps({"client_id": self.client_id, "config": self.config_hash}).encode()
        self.server_info = json.loads(self.link.call(HELLO, request, timeout=hello_timeout))
        self.end = ClientEnd(self.endpoint, self.server_info)
        self.link.call(HANDSHAKE, self.end.handshake)
        self._out = None
        return self.server_info

    def send(self, src: str, dst: str, data: bytes) -> None:
        if self.end is None:
            raise SplitleakError("the client is not connected: call connect() first")
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


def frame_kind(data: bytes) -> str:
    """The message kind of a plaintext frame (for logging and routing)."""
    return peek(data)[0]


Handler = Callable[[bytes, grpc.ServicerContext], bytes]


def generic_handler(hello: Handler, handshake: Handler, exchange: Handler) -> grpc.GenericRpcHandler:
    """The service with raw-bytes methods (no serializers: requests and replies are ``bytes``)."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Handshake": grpc.unary_unary_rpc_method_handler(handshake),
        "Exchange": grpc.unary_unary_rpc_method_handler(exchange),
    })


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """TLS with client authentication required: a client without a certificate signed by the CA never
    gets past the handshake. gRPC Python offers no minimum TLS version, so BoringSSL still completes a TLS 1.2
    handshake; the service refuses every call whose negotiated version (``ssl_tls_version`` in the auth
    context) is not TLS 1.3 (``suite.net.server.SplitService._who``)."""
    return grpc.ssl_server_credentials([(identity.key, identity.cert)], root_certificates=identity.ca,
                                       require_client_auth=True)
