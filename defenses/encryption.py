"""Authenticated encryption of every client↔server message — the channel FL-GLM describes, done properly.

Key establishment, per client and per session (``mode``):

* ``x25519`` (default): the client makes an ephemeral X25519 key pair and sends its public key; both sides
  compute the shared secret with the server's static X25519 key (pinned by the client, as a certificate
  would be) and derive one AES-256 key per direction with HKDF-SHA256 (salt = session id, info = protocol,
  client and direction).
* ``rsa``: the mode the FL-GLM paper describes — the client draws fresh AES-256 keys (one per direction) and
  sends them wrapped with RSA-OAEP (SHA-256) under the server's RSA public key.

Every message is then sealed with AES-256-GCM. The nonce is a per-direction counter (keys differ per
direction, so a nonce never repeats under one key); the associated data is the clear frame header, which
binds session, sender, receiver, counter, message kind, client id and step. The receiver rejects — before
anything reaches a model — a frame that fails authentication (tampered, truncated, wrong key), that
arrives out of sequence (replayed or reordered), that claims another channel, or whose decrypted content
disagrees with its header. One client's keys cannot open another client's traffic.

What stays visible on the wire: frame sizes (so tensor shapes), timing, and the header (kind, client, step).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from suite.defense import Defense, DefenseConfig, register_defense
from suite.errors import ProtocolError
from suite.protocol import peek
from suite.transport import SERVER, Tap, Transport

MAGIC = b"SPLE"
VERSION = 1
_PREFIX = struct.Struct(">4sHI")
_DIRECTIONS = ("to_server", "to_client")


class IntegrityError(ProtocolError):
    """A frame was rejected by the secure channel; it never reached a model."""


@dataclass(frozen=True)
class EncryptionConfig(DefenseConfig):
    mode: str = "x25519"  # "x25519" (ECDH + HKDF) or "rsa" (RSA-OAEP key wrap, as in FL-GLM)
    rsa_bits: int = 2048

    def __post_init__(self) -> None:
        if self.mode not in ("x25519", "rsa"):
            raise ValueError(f"mode must be 'x25519' or 'rsa', not {self.mode!r}")
        if self.rsa_bits < 2048:
            raise ValueError("rsa_bits must be >= 2048")


@dataclass
class _Channel:
    """One side's state for one client↔server channel."""

    keys: dict[str, AESGCM]  # per direction
    sent: dict[str, int]  # next counter to send, per direction
    expected: dict[str, int]  # next counter to accept, per direction


def _frame(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(raw)) + raw + body


def _unframe(data: bytes) -> tuple[dict, bytes, bytes]:
    """(header, header bytes used as associated data, body)."""
    if len(data) < _PREFIX.size:
        raise IntegrityError(f"rejected a frame of {len(data)} bytes: truncated")
    magic, version, n = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise IntegrityError("rejected a frame that is not an encrypted splitleak frame (plaintext or garbage)")
    raw = data[_PREFIX.size : _PREFIX.size + n]
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except ValueError as err:
        raise IntegrityError(f"rejected a frame with a malformed header: {err}") from None
    return header, data[: _PREFIX.size + n], data[_PREFIX.size + n :]


def _direction(src: str, dst: str) -> tuple[str, str]:
    """(client endpoint, direction) of a frame from ``src`` to ``dst``."""
    if dst == SERVER:
        return src, "to_server"
    if src == SERVER:
        return dst, "to_client"
    raise ProtocolError(f"the secure channel connects clients to the server, not {src} to {dst}")


class EncryptedTransport:
    """Wraps any byte transport. Both ends run in this object in one process, but each keeps its own key
    state, derived only from what it holds and what crossed the wire (the handshake frame)."""

    def __init__(self, inner: Transport, config: EncryptionConfig):
        self.inner = inner
        self.config = config
        self.session = os.urandom(16)
        self._server_x25519 = x25519.X25519PrivateKey.generate()
        self._server_rsa = (
            rsa.generate_private_key(public_exponent=65537, key_size=config.rsa_bits) if config.mode == "rsa" else None
        )
        self._client_side: dict[str, _Channel] = {}
        self._server_side: dict[str, _Channel] = {}
        self.rejected = 0

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

    # --- handshake ---------------------------------------------------------------------------------

    def _derive(self, secret: bytes, client: str) -> dict[str, AESGCM]:
        keys = {}
        for d in _DIRECTIONS:
            info = f"splitleak/v1|{client}|{d}".encode()
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=self.session, info=info).derive(secret)
            keys[d] = AESGCM(key)
        return keys

    def _client_handshake(self, client: str) -> _Channel:
        """Client side: make keys, send the handshake frame that lets the server make the same keys."""
        if self.config.mode == "x25519":
            eph = x25519.X25519PrivateKey.generate()
            keys = self._derive(eph.exchange(self._server_x25519.public_key()), client)
            payload = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = {d: AESGCM.generate_key(bit_length=256) for d in _DIRECTIONS}
            keys = {d: AESGCM(k) for d, k in raw.items()}
            oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
            public = self._server_rsa.public_key()
            payload = b"".join(public.encrypt(raw[d], oaep) for d in _DIRECTIONS)
        header = {"session": self.session.hex(), "src": client, "dst": SERVER, "kind": "handshake",
                  "mode": self.config.mode}
        self.inner.send(client, SERVER, _frame(header, payload))
        return _Channel(keys, dict.fromkeys(_DIRECTIONS, 0), dict.fromkeys(_DIRECTIONS, 0))

    def _server_handshake(self, client: str, data: bytes) -> _Channel:
        header, _, body = _unframe(data)
        if header.get("kind") != "handshake" or header.get("src") != client or header.get("mode") != self.config.mode:
            raise IntegrityError(f"rejected traffic from {client}: no valid handshake first")
        if header.get("session") != self.session.hex():
            raise IntegrityError(f"rejected a handshake from {client} for another session")
        try:
            if self.config.mode == "x25519":
                peer = x25519.X25519PublicKey.from_public_bytes(body)
                keys = self._derive(self._server_x25519.exchange(peer), client)
            else:
                oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
                n = self._server_rsa.key_size // 8
                if len(body) != 2 * n:
                    raise ValueError("wrapped keys of the wrong size")
                keys = {d: AESGCM(self._server_rsa.decrypt(body[i * n : (i + 1) * n], oaep))
                        for i, d in enumerate(_DIRECTIONS)}
        except ValueError as err:
            raise IntegrityError(f"rejected a handshake from {client}: {err}") from None
        return _Channel(keys, dict.fromkeys(_DIRECTIONS, 0), dict.fromkeys(_DIRECTIONS, 0))

    # --- messages ----------------------------------------------------------------------------------

    def send(self, src: str, dst: str, data: bytes) -> None:
        client, direction = _direction(src, dst)
        if direction == "to_server":
            channel = self._client_side.get(client) or self._client_side.setdefault(
                client, self._client_handshake(client))
        else:
            channel = self._server_side.get(client)
            if channel is None:
                raise ProtocolError(f"the server has no secure channel with {client} yet")
        kind, meta = peek(data)
        seq = channel.sent[direction]
        header = {"session": self.session.hex(), "src": src, "dst": dst, "seq": seq, "kind": kind,
                  "client_id": meta.get("client_id"), "step": meta.get("step")}
        nonce = seq.to_bytes(12, "big")
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        aad = _PREFIX.pack(MAGIC, VERSION, len(raw)) + raw
        self.inner.send(src, dst, aad + channel.keys[direction].encrypt(nonce, bytes(data), aad))
        channel.sent[direction] = seq + 1

    def recv(self, dst: str, src: str) -> bytes:
        client, direction = _direction(src, dst)
        try:
            if direction == "to_server":
                channel = self._server_side.get(client)
                if channel is None:
                    self._server_side[client] = self._server_handshake(client, self.inner.recv(dst, src))
                    channel = self._server_side[client]
            else:
                channel = self._client_side.get(client)
                if channel is None:
                    raise IntegrityError(f"{client} has no secure channel and cannot read server traffic")
            return self._open(channel, direction, src, dst, self.inner.recv(dst, src))
        except IntegrityError:
            self.rejected += 1
            raise

    def _open(self, channel: _Channel, direction: str, src: str, dst: str, data: bytes) -> bytes:
        header, aad, body = _unframe(data)
        if header.get("session") != self.session.hex() or header.get("src") != src or header.get("dst") != dst:
            raise IntegrityError(f"rejected a frame on {src}->{dst} that claims another session or channel")
        seq = header.get("seq")
        if seq != channel.expected[direction]:
            raise IntegrityError(f"rejected frame {seq} on {src}->{dst}: expected {channel.expected[direction]} "
                                 "(replayed, reordered or dropped)")
        try:
            plain = channel.keys[direction].decrypt(seq.to_bytes(12, "big"), body, aad)
        except (InvalidTag, ValueError, OverflowError):
            raise IntegrityError(f"rejected frame {seq} on {src}->{dst}: authentication failed "
                                 "(tampered, truncated or wrong key)") from None
        kind, meta = peek(plain)
        if (kind, meta.get("client_id"), meta.get("step")) != (header.get("kind"), header.get("client_id"),
                                                                header.get("step")):
            raise IntegrityError(f"rejected frame {seq} on {src}->{dst}: content disagrees with its header")
        channel.expected[direction] = seq + 1
        return plain


@register_defense("encryption")
class EncryptionDefense(Defense):
    Config = EncryptionConfig

    def __init__(self, config: EncryptionConfig | None = None):
        super().__init__(config)
        self.transport: EncryptedTransport | None = None

    def wrap_transport(self, transport: Transport) -> Transport:
        self.transport = EncryptedTransport(transport, self.config)
        return self.transport

    def report(self) -> dict:
        return {"mode": self.config.mode, "rejected_frames": self.transport.rejected if self.transport else 0}
