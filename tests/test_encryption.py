"""The secure channel: transparent to training, opaque to the wire, and it rejects every forged frame."""

import random

import pytest
import torch

from defenses.encryption import EncryptedTransport, EncryptionConfig, IntegrityError
from suite.engine.models import tiny_model
from suite.engine.protocol import TO_SERVER, ActivationMsg, decode, encode
from suite.engine.split import SplitSpec
from suite.engine.transport import SERVER, InProcessTransport, Recorder
from suite.errors import ConfigError, ProtocolError
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 3, "batch_size": 2},
})


def _msg(step: int, client: int = 0) -> bytes:
    hidden = torch.randn(1, 4, 8)
    return encode(ActivationMsg(client, step, TO_SERVER, hidden, torch.ones(1, 4, dtype=torch.long),
                                torch.arange(4).unsqueeze(0)))


@pytest.mark.parametrize("mode", ["x25519", "rsa"])
def test_messages_survive_the_channel_and_the_wire_sees_ciphertext(mode):
    inner = InProcessTransport()
    rec = Recorder()
    inner.add_tap(rec)
    channel = EncryptedTransport(inner, EncryptionConfig(mode=mode))
    for step in range(3):
        data = _msg(step)
        channel.send("client/0", SERVER, data)
        assert channel.recv(SERVER, "client/0") == data
        reply = _msg(step)
        channel.send(SERVER, "client/0", reply)
        assert channel.recv("client/0", SERVER) == reply
    assert rec.frames and all(f.data[:4] == b"SPLE" for f in rec.frames)
    for frame in rec.frames:
        with pytest.raises(ProtocolError):
            decode(frame.data)


def _armed():
    """A channel with one frame sent (not yet received), plus a frame of client 1 and of another session."""
    inner = InProcessTransport()
    channel = EncryptedTransport(inner, EncryptionConfig())
    channel.send("client/0", SERVER, _msg(0))
    channel.recv(SERVER, "client/0")  # handshake + first frame accepted
    channel.send("client/0", SERVER, _msg(1))
    good = inner._queues[("client/0", SERVER)].pop()
    channel.send("client/1", SERVER, _msg(1, client=1))
    inner._queues[("client/1", SERVER)].clear()
    rec = Recorder()
    inner.add_tap(rec)
    channel.send("client/1", SERVER, _msg(2, client=1))
    other_client = rec.frames[-1].data
    inner._queues[("client/1", SERVER)].clear()
    stranger = EncryptedTransport(InProcessTransport(), EncryptionConfig())
    stranger_rec = Recorder()
    stranger.add_tap(stranger_rec)
    stranger.send("client/0", SERVER, _msg(0))
    stranger.send("client/0", SERVER, _msg(1))
    return channel, inner, good, other_client, stranger_rec.frames[-1].data


def test_ten_thousand_forged_frames_are_all_rejected():
    channel, inner, good, other_client, other_session = _armed()
    rng = random.Random(0)
    first = None
    forged = []
    for i in range(10_000):
        kind = i % 5
        data = bytearray(good)
        if kind == 0:  # flip bits anywhere
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate or extend
            data = data[: rng.randrange(len(data))] if rng.random() < 0.7 else data + bytes([rng.randrange(256)])
        elif kind == 2:  # another client's frame (right key for that client, wrong channel)
            data = bytearray(other_client)
            if rng.random() < 0.5:  # and relabel its header as client 0's
                data = bytearray(bytes(data).replace(b'"src":"client/1"', b'"src":"client/0"'))
        elif kind == 3:  # a frame of another session (wrong key)
            data = bytearray(other_session)
        else:  # splice: good header with another frame's body
            cut = len(good) // 2
            data = bytearray(good[:cut] + other_client[cut:])
        if bytes(data) == good:
            continue
        forged.append(bytes(data))
    for data in forged:
        inner._queues[("client/0", SERVER)].append(data)
        with pytest.raises(IntegrityError) as err:
            channel.recv(SERVER, "client/0")
        first = first or str(err.value)
        assert "\n" not in str(err.value)
    assert len(forged) >= 9_990 and channel.rejected == len(forged)
    # The channel state was not disturbed: the genuine frame is still accepted, exactly once.
    inner._queues[("client/0", SERVER)].append(good)
    assert decode(channel.recv(SERVER, "client/0")).step == 1
    inner._queues[("client/0", SERVER)].append(good)
    with pytest.raises(IntegrityError, match="replayed"):
        channel.recv(SERVER, "client/0")


def test_reordered_frames_are_rejected():
    inner = InProcessTransport()
    channel = EncryptedTransport(inner, EncryptionConfig())
    for step in range(3):
        channel.send("client/0", SERVER, _msg(step))
    q = inner._queues[("client/0", SERVER)]
    handshake, f0, f1, f2 = list(q)
    q.clear()
    q.extend([handshake, f1])
    with pytest.raises(IntegrityError, match="expected 0"):
        channel.recv(SERVER, "client/0")
    q.extend([f0, f2])
    assert decode(channel.recv(SERVER, "client/0")).step == 0
    with pytest.raises(IntegrityError, match="expected 1"):
        channel.recv(SERVER, "client/0")


def test_one_client_cannot_read_another_clients_traffic():
    from cryptography.exceptions import InvalidTag

    from suite.engine.channel import _unframe

    channel, _, _, other_client, _ = _armed()
    header, aad, body = _unframe(other_client)
    nonce = header["seq"].to_bytes(12, "big")
    theirs = channel._client_side["client/1"].keys["to_server"]
    assert decode(theirs.decrypt(nonce, body, aad)).client_id == 1  # the right key opens it
    mine = channel._client_side["client/0"].keys["to_server"]
    with pytest.raises(InvalidTag):
        mine.decrypt(nonce, body, aad)  # client 0's key, with every header field right, does not


def test_plaintext_is_rejected_by_an_encrypted_receiver():
    inner = InProcessTransport()
    channel = EncryptedTransport(inner, EncryptionConfig())
    channel.send("client/0", SERVER, _msg(0))
    channel.recv(SERVER, "client/0")
    inner.send("client/0", SERVER, _msg(1))  # a downgrade: the same message, unencrypted
    with pytest.raises(IntegrityError, match="not an encrypted"):
        channel.recv(SERVER, "client/0")


def _windows(t: torch.Tensor) -> list[bytes]:
    """The raw bytes of a tensor in 16-byte windows (constant windows, e.g. zero padding, left out)."""
    raw = t.detach().contiguous().view(torch.uint8).numpy().tobytes()
    return [raw[i : i + 16] for i in range(0, len(raw) - 15, 16) if len(set(raw[i : i + 16])) > 1]


def _wire_index(frames) -> set[bytes]:
    return {f.data[i : i + 16] for f in frames for i in range(len(f.data) - 15)}


def test_encryption_is_transparent_to_training_and_no_tensor_byte_crosses_the_wire(monkeypatch):
    """Every activation and gradient either party received, searched for on the wire as 16-byte windows of its
    raw buffer: all found on a plaintext wire (so the search works), none on the encrypted one."""
    import suite.engine.parties
    import suite.experiment.cell

    received = []
    capturing = [False]  # only the capture pass is on the wire record (the held-out evaluation comes after)

    def recording(data, *args, **kw):
        msg = decode(data, *args, **kw)
        if capturing[0]:
            received.append(msg)
        return msg

    def capture(*args, _inner=suite.experiment.cell.capture_traffic, **kw):
        capturing[0] = True
        try:
            return _inner(*args, **kw)
        finally:
            capturing[0] = False

    monkeypatch.setattr(suite.engine.parties, "decode", recording)
    monkeypatch.setattr(suite.experiment.cell, "capture_traffic", capture)
    base = tiny_model("llama")
    threat = get_threat("eavesdropper")
    runs = {}
    for name, defense in (("plain", None), ("encrypted", make_defense("encryption"))):
        received.clear()
        runs[name] = trained = train_split(CFG, SplitSpec(1, 1), base, defense=defense)
        windows = [w for msg in received for t in msg.tensors().values()
                   if t.is_floating_point() for w in _windows(t)]
        assert len(windows) > 1000
        index = _wire_index(trained.capture.frames)
        found = sum(w in index for w in windows)
        if name == "plain":
            assert found == len(windows)  # the search finds plaintext tensor bytes where they are
        else:
            assert found == 0  # no 16 bytes of any activation or gradient appear in the ciphertext
    assert runs["encrypted"].prepared.session.losses == runs["plain"].prepared.session.losses  # bit-identical
    from suite.interfaces.attack import make_attack

    wire = make_attack("wire_inversion", threat)
    leaked = attack_trained(runs["plain"], threat, wire, CFG).metrics
    assert leaked.token_accuracy > 0.5
    blind = attack_trained(runs["encrypted"], threat, wire, CFG)
    assert "ciphertext" in blind.reconstruction.note  # nothing on the wire decodes


def test_bad_encryption_parameters():
    with pytest.raises(ConfigError, match="mode"):
        make_defense("encryption", {"mode": "rot13"})
    with pytest.raises(ConfigError, match="no parameter"):
        make_defense("encryption", {"cipher": "aes"})


def test_frames_between_stages_are_sealed_per_link_and_a_tampered_one_is_rejected():
    """With pipeline stages every stage <-> stage link is a channel of its own: the wire between stages holds
    no plaintext, training is unchanged, one link's keys open no other link's frames, a tampered frame is
    rejected, and stages that are not neighbours have no channel."""
    from suite.engine.training import TrainConfig, build_session, train

    ids = torch.randint(3, 60, (4, 8), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.long), "labels": ids.clone()}
    runs = {}
    for name in ("none", "encryption"):
        inner = InProcessTransport()
        rec = Recorder()
        inner.add_tap(rec)
        transport = make_defense("encryption").wrap_transport(inner) if name == "encryption" else inner
        session = build_session(tiny_model("llama").model, SplitSpec(0, 1), [data],
                                TrainConfig(clients=1, steps=2, batch_size=2, stages=3), transport=transport)
        train(session)
        runs[name] = (session.losses, rec.frames, transport)
    assert runs["encryption"][0] == runs["none"][0]  # transparent to training
    clear = [f for f in runs["none"][1] if f.src.startswith("stage/") and f.dst.startswith("stage/")]
    sealed = [f for f in runs["encryption"][1] if f.src.startswith("stage/") and f.dst.startswith("stage/")]
    assert {(f.src, f.dst) for f in sealed} == {("stage/0", "stage/1"), ("stage/1", "stage/2"),
                                                 ("stage/1", "stage/0"), ("stage/2", "stage/1")}
    assert all(f.data[:4] == b"SPLE" for f in sealed)
    for f in clear:  # no 32-byte run of any tensor between stages appears on the encrypted wire
        msg = decode(f.data)
        tensor = msg.hidden if isinstance(msg, ActivationMsg) else msg.grad
        raw = tensor.detach().contiguous().numpy().tobytes()
        assert raw[:32] in f.data and not any(raw[:32] in g.data or raw[-32:] in g.data for g in sealed)
    for frame in sealed:
        with pytest.raises(ProtocolError):
            decode(frame.data)

    channel = runs["encryption"][2]
    assert len(channel.stage_servers) == 2 and channel.stage_servers["stage/1"].session != \
        channel.stage_servers["stage/2"].session  # each link its own keys
    channel.send("stage/0", "stage/1", _msg(9))
    queue = channel.inner._queues[("stage/0", "stage/1")]
    tampered = bytearray(queue.pop())
    tampered[-5] ^= 1
    queue.append(bytes(tampered))
    with pytest.raises(IntegrityError, match="authentication failed"):
        channel.recv("stage/1", "stage/0")
    channel.send("stage/1", "stage/2", _msg(9))
    frame = channel.inner._queues[("stage/1", "stage/2")].pop()
    channel.inner._queues[("stage/0", "stage/1")].append(frame)  # stage 1 -> 2's frame replayed on link 0 -> 1
    with pytest.raises(IntegrityError):
        channel.recv("stage/1", "stage/0")
    with pytest.raises(ProtocolError, match="not neighbouring stages"):
        channel.send("stage/0", "stage/2", _msg(9))
