"""Fuzzing the receiving end: mutated, truncated, reordered, replayed and wrong-key frames and headers never
reach the model, and genuine frames always do."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from suite.engine.channel import ClientEnd, IntegrityError, ServerEnd, ServerKeys
from suite.engine.protocol import TO_SERVER, ActivationMsg, Expect, decode, encode
from suite.errors import ProtocolError
from suite.harness.fuzz import INSIDER_KINDS, WIRE_KINDS, run_fuzz

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXPECT = Expect(hidden_size=8)


def _msg(step: int) -> bytes:
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 3] = 0
    return encode(ActivationMsg(0, step, TO_SERVER, torch.randn(2, 4, 8), mask, torch.arange(4).expand(2, 4)))


GOOD = _msg(5)
HEADER_END = 10 + int.from_bytes(GOOD[6:10], "big")
ST_END = HEADER_END + 8 + int.from_bytes(GOOD[HEADER_END : HEADER_END + 8], "little")


def _receive(data: bytes, step: int = 5) -> ActivationMsg:
    """What ``Server._recv`` does with a plaintext: decode under the trunk's policy, then the protocol checks."""
    msg = decode(data, EXPECT)
    if not isinstance(msg, ActivationMsg) or (msg.client_id, msg.step, msg.direction) != (0, step, TO_SERVER):
        raise ProtocolError("not the expected message")
    return msg


def test_the_genuine_message_is_accepted():
    assert _receive(GOOD).hidden.shape == (2, 4, 8)


@SETTINGS
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_refused_with_a_protocol_error(data):
    with pytest.raises(ProtocolError):
        _receive(data)


@SETTINGS
@given(st.data())
def test_mutated_message_and_tensor_headers_are_refused(data):
    """Any change to the message header or the safetensors header (dtype, shape, offsets, padding)."""
    out = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, ST_END - 1))
        out[at] = data.draw(st.integers(0, 255).filter(lambda b, at=at: b != GOOD[at]))
    with pytest.raises(ProtocolError):
        _receive(bytes(out))


@SETTINGS
@given(cut=st.integers(0, len(GOOD) - 1), extra=st.binary(min_size=1, max_size=64))
def test_truncated_or_extended_messages_are_refused(cut, extra):
    with pytest.raises(ProtocolError):
        _receive(GOOD[:cut])
    with pytest.raises(ProtocolError):
        _receive(GOOD + extra)


def _pair():
    server = ServerEnd(ServerKeys())
    client = ClientEnd("client/0", server.public_for("client/0"))
    server.accept("client/0", client.handshake)
    return server, client


@SETTINGS
@given(st.data())
def test_mutated_sealed_frames_are_refused_and_leave_the_channel_intact(data):
    server, client = _pair()
    frame = client.seal(GOOD)
    edit = data.draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete"]))
    at = data.draw(st.integers(0, len(frame) - 1))
    if edit == "flip":
        bad = frame[:at] + bytes([frame[at] ^ data.draw(st.integers(1, 255))]) + frame[at + 1 :]
    elif edit == "truncate":
        bad = frame[:at]
    elif edit == "extend":
        bad = frame + data.draw(st.binary(min_size=1, max_size=32))
    elif edit == "insert":
        bad = frame[:at] + data.draw(st.binary(min_size=1, max_size=4)) + frame[at:]
    else:
        bad = frame[:at] + frame[at + 1 :]
    with pytest.raises(IntegrityError):
        server.open("client/0", bad)
    assert _receive(server.open("client/0", frame)).step == 5  # the genuine frame still goes through


@SETTINGS
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_reordered_and_replayed_frames_are_refused(order):
    """Deliver frames 0..5 in any order with repeats: a frame is accepted exactly when it is the next one in
    sequence, so the accepted steps are 0, 1, 2, ... each once."""
    server, client = _pair()
    frames = [client.seal(_msg(s)) for s in range(6)]
    accepted = []
    for i in order:
        try:
            accepted.append(decode(server.open("client/0", frames[i]), EXPECT).step)
        except IntegrityError:
            pass
    assert accepted == list(range(len(accepted)))
    expected_next = 0
    for i in order:
        expected_next += i == expected_next
    assert len(accepted) == expected_next


def test_frames_under_another_key_are_refused():
    server, _ = _pair()
    other = ClientEnd("client/1", server.public_for("client/1"))
    server.accept("client/1", other.handshake)
    stranger = ClientEnd("client/0", ServerEnd(ServerKeys()).public_for("client/0"))
    theirs = other.seal(encode(ActivationMsg(1, 5, TO_SERVER, torch.randn(2, 4, 8))))
    for frame in (stranger.seal(GOOD), theirs, theirs.replace(b"client/1", b"client/0")):
        with pytest.raises(IntegrityError):
            server.open("client/0", frame)


def test_the_seeded_fuzzer_rejects_every_case_and_accepts_every_control():
    result = run_fuzz(600, seed=7)
    assert result.cases == 600 and result.rejected == 600 and result.reached == 0
    assert result.controls >= 10 and result.controls_accepted == result.controls
    assert set(result.by_kind) == set(WIRE_KINDS + INSIDER_KINDS)
    assert all("\n" not in e for e in result.first_errors.values())
    again = run_fuzz(600, seed=7)
    assert again.by_kind == result.by_kind  # seeded: the same cases
