"""Authenticated encryption of every client↔server message — the channel FL-GLM describes, done properly.

Key establishment, per client and per session (``mode``):

* ``x25519`` (default): the client makes an ephemeral X25519 key pair and sends its public key; both sides
  compute the shared secret with the server's static X25519 key (pinned by the client, as a certificate
  would be) and derive one AES-256 key per direction with HKDF-SHA256 (salt = session id | server nonce |
  client nonce, info = protocol, client and direction).
* ``rsa``: the mode the FL-GLM paper describes — the client draws a fresh 256-bit secret and sends it
  wrapped with RSA-OAEP (SHA-256) under the server's RSA public key; the keys are derived from it as above.

Fresh server randomness in every handshake: the server hands each client a one-time random challenge
(server nonce) before its handshake; it enters the key derivation, and a handshake that does not answer the
current challenge, or whose client nonce or key-exchange payload the server has seen before, is refused. So
a replayed handshake (from a TLS-terminating proxy, say) never resets a channel under old keys, and no
(key, nonce) pair is ever used twice.

Every message is then sealed with AES-256-GCM. The nonce is a per-direction counter (keys differ per
direction, so a nonce never repeats under one key); the associated data is the clear frame header, which
binds session, sender, receiver, counter, message kind, client id and step. The receiver rejects — before
anything reaches a model — a frame that fails authentication (tampered, truncated, wrong key), that
arrives out of sequence (replayed or reordered), that claims another channel, or whose decrypted content
disagrees with its header. One client's keys cannot open another client's traffic.

What stays visible on the wire: frame sizes (so tensor shapes), timing, and the header (kind, client, step).

Pipeline stages (``[training] stages`` > 1, ``suite.engine.stages``): every link between neighbouring stages
is a channel of its own, built the same way: the downstream stage ``stage/<i+1>`` holds its own keys (a
``ServerEnd``), the upstream ``stage/<i>`` makes the handshake (a ``ClientEnd``), and the activations going
down and the gradients coming back are sealed with that link's keys. A frame between stages that are not
neighbours is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from suite.engine.channel import ClientEnd, IntegrityError, ServerEnd, ServerKeys, _Channel
from suite.engine.transport import SERVER, Tap, Transport
from suite.errors import ProtocolError
from suite.interfaces.defense import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class EncryptionConfig(DefenseConfig):
    mode: str = "x25519"  # "x25519" (ECDH + HKDF) or "rsa" (RSA-OAEP key wrap, as in FL-GLM)
    rsa_bits: int = 2048

    def __post_init__(self) -> None:
        if self.mode not in ("x25519", "rsa"):
            raise ValueError(f"mode must be 'x25519' or 'rsa', not {self.mode!r}")
        if self.rsa_bits < 2048:
            raise ValueError("rsa_bits must be >= 2048")


def _direction(src: str, dst: str) -> tuple[str, str]:
    """(client endpoint, direction) of a frame from ``src`` to ``dst``."""
    if dst == SERVER:
        return src, "to_server"
    if src == SERVER:
        return dst, "to_client"
    raise ProtocolError(f"the secure channel connects clients to the server, not {src} to {dst}")


def _between_stages(src: str, dst: str) -> bool:
    """A frame between two pipeline stages (``stage/i``, ``suite.engine.stages``): sealed on that link's own
    channel (``_stage_link``)."""
    return src.startswith("stage/") and dst.startswith("stage/")


def _stage_link(src: str, dst: str) -> tuple[str, str, str]:
    """(upstream stage, downstream stage, direction) of a frame between two neighbouring stages."""
    try:
        i, j = int(src.removeprefix("stage/")), int(dst.removeprefix("stage/"))
    except ValueError:
        raise ProtocolError(f"not a stage endpoint: {src} -> {dst}") from None
    if j == i + 1:
        return src, dst, "to_server"
    if i == j + 1:
        return dst, src, "to_client"
    raise ProtocolError(f"{src} and {dst} are not neighbouring stages: no channel between them")


class EncryptedTransport:
    """Wraps any byte transport. Both ends run in this object in one process, but each keeps its own key
    state (a ``ClientEnd`` per client, one ``ServerEnd``), derived only from what it holds and what crossed
    the wire (the handshake frame). Across processes the same ends run on each side (``suite.net``)."""

    def __init__(self, inner: Transport, config: EncryptionConfig):
        self.inner = inner
        self.config = config
        self.server = ServerEnd(ServerKeys(config.mode, config.rsa_bits))
        self.session = self.server.keys.session
        self.clients: dict[str, ClientEnd] = {}
        # pipeline stages: each downstream stage's own keys, each upstream stage's end of its link
        self.stage_servers: dict[str, ServerEnd] = {}
        self.stage_clients: dict[tuple[str, str], ClientEnd] = {}
        self.rejected = 0

    @property
    def _client_side(self) -> dict[str, _Channel]:
        return {c: end.channel for c, end in self.clients.items()}

    # taps see the wire, i.e. ciphertext
    def add_tap(self, tap: Tap) -> None:
        self.inner.add_tap(tap)

    def remove_tap(self, tap: Tap) -> None:
        self.inner.remove_tap(tap)

    @property
    def bytes_sent(self) -> int:
        return getattr(self.inner, "bytes_sent", 0)

    def pending(self) -> int:
        return self.inner.pending()

    def _stage_server(self, down: str) -> ServerEnd:
        end = self.stage_servers.get(down)
        if end is None:
            end = self.stage_servers[down] = ServerEnd(ServerKeys(self.config.mode, self.config.rsa_bits))
        return end

    def _send_between_stages(self, src: str, dst: str, data: bytes) -> None:
        up, down, direction = _stage_link(src, dst)
        if direction == "to_server":
            end = self.stage_clients.get((up, down))
            if end is None:
                end = self.stage_clients[(up, down)] = ClientEnd(up, self._stage_server(down).public_for(up))
                self.inner.send(up, down, end.handshake)
            self.inner.send(src, dst, end.seal(data))
        else:
            server = self.stage_servers.get(down)
            if server is None or up not in server.channels:
                raise ProtocolError(f"{down} has no secure channel with {up} yet")
            self.inner.send(src, dst, server.seal(up, data))

    def _recv_between_stages(self, dst: str, src: str) -> bytes:
        up, down, direction = _stage_link(src, dst)
        if direction == "to_server":
            server = self._stage_server(down)
            if up not in server.channels:
                server.accept(up, self.inner.recv(dst, src))
            return server.open(up, self.inner.recv(dst, src))
        end = self.stage_clients.get((up, down))
        if end is None:
            raise IntegrityError(f"{up} has no secure channel with {down} and cannot read its traffic")
        return end.open(self.inner.recv(dst, src))

    def send(self, src: str, dst: str, data: bytes) -> None:
        if _between_stages(src, dst):
            self._send_between_stages(src, dst, data)
            return
        client, direction = _direction(src, dst)
        if direction == "to_server":
            end = self.clients.get(client)
            if end is None:
                end = self.clients[client] = ClientEnd(client, self.server.public_for(client))
                self.inner.send(client, SERVER, end.handshake)
            self.inner.send(src, dst, end.seal(data))
        else:
            if client not in self.server.channels:
                raise ProtocolError(f"the server has no secure channel with {client} yet")
            self.inner.send(src, dst, self.server.seal(client, data))

    def recv(self, dst: str, src: str) -> bytes:
        try:
            if _between_stages(src, dst):
                return self._recv_between_stages(dst, src)
            client, direction = _direction(src, dst)
            if direction == "to_server":
                if client not in self.server.channels:
                    self.server.accept(client, self.inner.recv(dst, src))
                return self.server.open(client, self.inner.recv(dst, src))
            end = self.clients.get(client)
            if end is None:
                raise IntegrityError(f"{client} has no secure channel and cannot read server traffic")
            return end.open(self.inner.recv(dst, src))
        except IntegrityError:
            self.rejected += 1
            raise


@register_defense("encryption")
class EncryptionDefense(Defense):
    Config = EncryptionConfig
    wire_only = True  # the server decrypts: its view, and training, equal the undefended run's

    def __init__(self, config: EncryptionConfig | None = None):
        super().__init__(config)
        self.transport: EncryptedTransport | None = None

    def wrap_transport(self, transport: Transport) -> Transport:
        self.transport = EncryptedTransport(transport, self.config)
        return self.transport

    def report(self) -> dict:
        # what it protects (the report reads it: a threat that decrypts, the server, is not addressed)
        return {"mode": self.config.mode, "rejected_frames": self.transport.rejected if self.transport else 0,
                "protects": ["wire"]}
