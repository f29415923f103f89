"""Handshake replay: a captured handshake and its frames, replayed 1,000 times, never make the server derive
old keys again, never make it seal two frames with one (key, nonce) pair, and never get a frame accepted."""

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import suite.engine.channel as channel_mod
from suite.engine.channel import ClientEnd, IntegrityError, ServerEnd, ServerKeys
from suite.engine.protocol import TO_CLIENT, TO_SERVER, ActivationMsg, GradientMsg, decode, encode


class _CountingAESGCM:
    """AES-GCM that records the (key, nonce) pair of every seal (wraps the real one)."""

    sealed: list[tuple[bytes, bytes]] = []

    def __init__(self, key: bytes):
        self._key, self._aead = bytes(key), AESGCM(key)

    def encrypt(self, nonce, data, aad):
        _CountingAESGCM.sealed.append((self._key, bytes(nonce)))
        return self._aead.encrypt(nonce, data, aad)

    def decrypt(self, nonce, data, aad):
        return self._aead.decrypt(nonce, data, aad)


@pytest.fixture
def sealed(monkeypatch):
    _CountingAESGCM.sealed = []
    monkeypatch.setattr(channel_mod, "AESGCM", _CountingAESGCM)
    return _CountingAESGCM.sealed


def _act(step: int) -> bytes:
    return encode(ActivationMsg(0, step, TO_SERVER, torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.long),
                                torch.arange(3).unsqueeze(0)))


def _reply(step: int) -> bytes:
    return encode(GradientMsg(0, step, TO_CLIENT, torch.randn(1, 3, 4)))


@pytest.mark.parametrize("mode", ["x25519", "rsa"])
def test_a_replayed_handshake_and_frames_are_refused_and_no_key_nonce_pair_repeats(sealed, mode):
    server = ServerEnd(ServerKeys(mode))
    me = "client/0"
    # The genuine session, captured by an attacker in the path (a TLS-terminating proxy, say).
    client = ClientEnd(me, server.public_for(me))
    server.accept(me, client.handshake)
    captured = [client.seal(_act(s)) for s in range(3)]
    for s, frame in enumerate(captured):
        assert decode(server.open(me, frame)).step == s
        client.open(server.seal(me, _reply(s)))
    step = 3
    refused = {"handshake": 0, "frame": 0}
    for i in range(1000):
        if i % 2:  # the attacker first asks for a fresh challenge, as a proxy relaying Hello can
            server.public_for(me)
        with pytest.raises(IntegrityError, match="replayed|challenge"):
            server.accept(me, client.handshake)
        refused["handshake"] += 1
        for frame in captured:
            with pytest.raises(IntegrityError):
                server.open(me, frame)
            refused["frame"] += 1
        # The server goes on answering on whatever channel it has: the seals it makes are recorded.
        server.seal(me, _reply(step))
        step += 1
        if i % 100 == 99:  # now and then the genuine client reconnects: a new handshake, new keys
            client = ClientEnd(me, server.public_for(me))
            server.accept(me, client.handshake)
            assert decode(server.open(me, client.seal(_act(step)))).step == step
            step += 1
    assert refused == {"handshake": 1000, "frame": 3000}
    assert len(sealed) > 1000
    assert len(set(sealed)) == len(sealed)  # no (key, nonce) pair was ever used twice


def test_a_handshake_without_the_current_challenge_is_refused_and_keys_depend_on_it():
    server = ServerEnd(ServerKeys())
    me = "client/0"
    stale = ClientEnd(me, server.public_for(me))
    fresh = ClientEnd(me, server.public_for(me))  # a new challenge replaces the old one
    with pytest.raises(IntegrityError, match="challenge"):
        server.accept(me, stale.handshake)
    server.accept(me, fresh.handshake)
    with pytest.raises(IntegrityError, match="challenge"):  # each challenge is good for one handshake
        server.accept(me, fresh.handshake)
    with pytest.raises(IntegrityError, match="current challenge"):  # no challenge issued to client 1
        server.accept("client/1", ClientEnd("client/1", {**server.keys.public(), "challenge": "00" * 16}).handshake)
    # The client's nonce and key are remembered: the same handshake under a new challenge (a forger who
    # rewrites the header) is refused as a replay too.
    challenge = server.public_for(me)["challenge"]
    forged = fresh.handshake.replace(fresh.handshake.split(b'"server_nonce":"')[1][:32], challenge.encode())
    with pytest.raises(IntegrityError, match="replayed"):
        server.accept(me, forged)
