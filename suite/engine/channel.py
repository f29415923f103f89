"""The authenticated channel between a client and the server: key agreement and AES-256-GCM frames.

Each side holds only its own part: the server a ``ServerKeys`` (session id and private key) and a
``ServerEnd`` with one channel per client; a client a ``ClientEnd`` built from the server's public info.
The in-process ``encryption`` defense (``defenses/encryption.py``) runs both ends in one object; the
process-to-process link (``suite.net``) runs one end on each side. Details of the construction are in the
defense's docstring.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from suite.engine.protocol import peek
from suite.engine.transport import SERVER
from suite.errors import ProtocolError

MAGIC = b"SPLE"
VERSION = 1
_PREFIX = struct.Struct(">4sHI")
_DIRECTIONS = ("to_server", "to_client")


class IntegrityError(ProtocolError):
    """A frame was rejected by the secure channel; it never reached a model."""


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


_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class ServerKeys:
    """What the server holds: a session id and its private key (X25519, or RSA for the key-wrap mode).
    ``public()`` is what a client must learn authentically (pinned, or sent over an authenticated channel
    such as mutual TLS) before its first message."""

    def __init__(self, mode: str = "x25519", rsa_bits: int = 2048):
        if mode not in ("x25519", "rsa"):
            raise ProtocolError(f"key exchange mode must be 'x25519' or 'rsa', not {mode!r}")
        self.mode = mode
        self.session = os.urandom(16)
        self.x25519 = x25519.X25519PrivateKey.generate()
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits) if mode == "rsa" else None

    def public(self) -> dict[str, str]:
        if self.mode == "x25519":
            key = self.x25519.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            key = self.rsa.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"session": self.session.hex(), "mode": self.mode, "key": key.hex()}


def _derive(secret: bytes, salt: bytes, client: str) -> dict[str, AESGCM]:
    """One AES-256 key per direction. ``salt`` = session id | server nonce | client nonce: the server's fresh
    nonce makes every handshake's keys new even if a client's handshake is replayed."""
    keys = {}
    for d in _DIRECTIONS:
        info = f"splitleak/v1|{client}|{d}".encode()
        keys[d] = AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret))
    return keys


_NONCE_BYTES = 16
_P25519 = 2**255 - 19


def x25519_public(raw: bytes, whose: str) -> x25519.X25519PublicKey:
    """An X25519 public key from its 32 bytes, refusing every non-canonical encoding: bit 255 set, or u >=
    2^255 - 19. X25519 ignores bit 255 and reduces u mod p, so such bytes name the same key as another
    encoding: a replayed handshake with one bit flipped would slip past the record of key payloads seen
    (``ServerEnd.accept``) and reset the victim's channel."""
    if len(raw) != 32:
        raise ValueError(f"{whose} X25519 public key is {len(raw)} bytes, not 32")
    if raw[31] & 0x80:
        raise ValueError(f"{whose} X25519 public key is not canonical (bit 255 is set)")
    if int.from_bytes(raw, "little") >= _P25519:
        raise ValueError(f"{whose} X25519 public key is not canonical (u >= 2^255 - 19)")
    return x25519.X25519PublicKey.from_public_bytes(raw)


def _fresh(keys: dict[str, AESGCM]) -> _Channel:
    return _Channel(keys, dict.fromkeys(_DIRECTIONS, 0), dict.fromkeys(_DIRECTIONS, 0))


def _seal(channel: _Channel, session: str, src: str, dst: str, direction: str, data: bytes) -> bytes:
    kind, meta = peek(data)
    seq = channel.sent[direction]
    header = {"session": session, "src": src, "dst": dst, "seq": seq, "kind": kind,
              "client_id": meta.get("client_id"), "step": meta.get("step")}
    aad = _frame(header, b"")  # the clear header is the associated data
    sealed = aad + channel.keys[direction].encrypt(seq.to_bytes(12, "big"), bytes(data), aad)
    channel.sent[direction] = seq + 1
    return sealed


def _open(channel: _Channel, session: str, direction: str, src: str, dst: str, data: bytes) -> bytes:
    header, aad, body = _unframe(data)
    if header.get("session") != session or header.get("src") != src or header.get("dst") != dst:
        raise IntegrityError(f"rejected a frame on {src}->{dst} that claims another session or channel")
    seq = header.get("seq")
    if not isinstance(seq, int) or seq != channel.expected[direction]:
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


class ClientEnd:
    """A client's side of its channel, built only from what the client holds: the server's public info,
    including the fresh one-time ``challenge`` (server nonce) the server issued to it for this handshake."""

    def __init__(self, client: str, server_public: dict[str, str]):
        self.client = client
        self.session = server_public["session"]
        mode, key = server_public["mode"], bytes.fromhex(server_public["key"])
        challenge = server_public.get("challenge")
        if not isinstance(challenge, str):
            raise ProtocolError("the server sent no handshake challenge: it speaks an older, replayable protocol")
        client_nonce = os.urandom(_NONCE_BYTES)
        salt = bytes.fromhex(self.session) + bytes.fromhex(challenge) + client_nonce
        if mode == "x25519":
            eph = x25519.X25519PrivateKey.generate()
            try:
                secret = eph.exchange(x25519_public(key, "the server's"))
            except ValueError as err:
                raise ProtocolError(f"refused the server's public info: {err}") from None
            payload = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        elif mode == "rsa":
            secret = os.urandom(32)
            payload = serialization.load_der_public_key(key).encrypt(secret, _OAEP)
        else:
            raise ProtocolError(f"the server offers an unknown key exchange {mode!r}")
        self.channel = _fresh(_derive(secret, salt, client))
        header = {"session": self.session, "src": client, "dst": SERVER, "kind": "handshake", "mode": mode,
                  "server_nonce": challenge, "client_nonce": client_nonce.hex()}
        self.handshake = _frame(header, payload)  # the first frame the client sends

    def seal(self, data: bytes) -> bytes:
        return _seal(self.channel, self.session, self.client, SERVER, "to_server", data)

    def open(self, data: bytes) -> bytes:
        return _open(self.channel, self.session, "to_client", SERVER, self.client, data)


class ServerEnd:
    """The server's side of every client's channel.

    Replay protection: before each handshake the server issues the client a fresh random ``challenge``
    (server nonce) that enters the key derivation and is good for one handshake only; it also remembers
    every client nonce and every key-exchange payload it ever accepted under its key, and refuses an X25519
    key in any but its canonical encoding (``x25519_public``). A replayed handshake is refused, so the
    server never derives the same keys twice and never seals two frames with one (key, nonce) pair."""

    def __init__(self, keys: ServerKeys):
        self.keys = keys
        self.session = keys.session.hex()
        self.channels: dict[str, _Channel] = {}
        self.challenges: dict[str, str] = {}  # client -> its outstanding one-time server nonce
        self.seen: set[bytes] = set()  # digests of client nonces and key-exchange payloads accepted

    def challenge(self, client: str) -> str:
        """A fresh server nonce for ``client``'s next handshake (replaces any earlier one)."""
        nonce = os.urandom(_NONCE_BYTES).hex()
        self.challenges[client] = nonce
        return nonce

    def public_for(self, client: str) -> dict[str, str]:
        """What ``client`` needs to build its ``ClientEnd``: the public key info plus a fresh challenge."""
        return {**self.keys.public(), "challenge": self.challenge(client)}

    def accept(self, client: str, data: bytes) -> None:
        """Derive ``client``'s keys from its handshake frame (a new handshake replaces the old channel: a
        client that restarts starts a fresh channel). Refuses a handshake that does not answer the client's
        outstanding challenge, or whose client nonce or key-exchange payload was seen before (replay)."""
        header, _, body = _unframe(data)
        mode = self.keys.mode
        if header.get("kind") != "handshake" or header.get("src") != client or header.get("mode") != mode:
            raise IntegrityError(f"rejected traffic from {client}: no valid handshake first")
        if header.get("session") != self.session:
            raise IntegrityError(f"rejected a handshake from {client} for another session")
        server_nonce, client_nonce = header.get("server_nonce"), header.get("client_nonce")
        if not isinstance(server_nonce, str) or server_nonce != self.challenges.get(client):
            raise IntegrityError(f"rejected a handshake from {client}: it does not answer this server's current "
                                 "challenge (replayed or stale)")
        del self.challenges[client]  # one handshake per challenge
        try:
            nonce = bytes.fromhex(client_nonce) if isinstance(client_nonce, str) else b""
        except ValueError:
            nonce = b""
        if len(nonce) != _NONCE_BYTES:
            raise IntegrityError(f"rejected a handshake from {client}: malformed client nonce")
        marks = {hashlib.sha256(b"nonce" + nonce).digest(), hashlib.sha256(b"payload" + body).digest()}
        if marks & self.seen:
            raise IntegrityError(f"rejected a handshake from {client}: replayed (client nonce or key seen before)")
        salt = self.keys.session + bytes.fromhex(server_nonce) + nonce
        try:
            if mode == "x25519":
                secret = self.keys.x25519.exchange(x25519_public(body, "its"))
            else:
                if len(body) != self.keys.rsa.key_size // 8:
                    raise ValueError("wrapped key of the wrong size")
                secret = self.keys.rsa.decrypt(body, _OAEP)
                if len(secret) != 32:
                    raise ValueError("wrapped key of the wrong size")
        except ValueError as err:
            raise IntegrityError(f"rejected a handshake from {client}: {err}") from None
        self.seen |= marks
        self.channels[client] = _fresh(_derive(secret, salt, client))

    def _channel(self, client: str) -> _Channel:
        channel = self.channels.get(client)
        if channel is None:
            raise IntegrityError(f"rejected traffic from {client}: no valid handshake first")
        return channel

    def seal(self, client: str, data: bytes) -> bytes:
        return _seal(self._channel(client), self.session, SERVER, client, "to_client", data)

    def open(self, client: str, data: bytes) -> bytes:
        return _open(self._channel(client), self.session, "to_server", client, SERVER, data)


