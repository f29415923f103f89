"""Every message survives the wire bit for bit; anything else is rejected with a clear error."""

import struct

import pytest
import torch

from suite.engine.protocol import TO_CLIENT, TO_SERVER, ActivationMsg, GradientMsg, decode, encode
from suite.engine.transport import Frame, InProcessTransport, Recorder
from suite.errors import ProtocolError


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _same(a, b) -> None:
    assert type(a) is type(b)
    assert (a.client_id, a.step, a.direction) == (b.client_id, b.step, b.direction)
    for name, t in a.tensors().items():
        u = getattr(b, name)
        assert u.dtype == t.dtype and u.shape == t.shape and _bits(u) == _bits(t), name
    assert set(a.tensors()) == set(b.tensors())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_activation_round_trip_bit_exact(dtype):
    hidden = torch.randn(2, 5, 8).to(dtype)
    hidden[0, 0, 0] = float("nan")
    hidden[1, 1, 1] = float("-inf")
    hidden[1, 2, 2] = -0.0
    msg = ActivationMsg(3, 17, TO_SERVER, hidden, torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]),
                        torch.arange(5).expand(2, 5))
    _same(msg, decode(encode(msg)))
    assert encode(decode(encode(msg))) == encode(msg)


def test_optional_tensors_and_gradient_round_trip():
    act = ActivationMsg(0, 0, TO_CLIENT, torch.randn(1, 3, 4))
    back = decode(encode(act))
    assert back.attention_mask is None and back.position_ids is None
    _same(act, back)
    grad = GradientMsg(1, 2, TO_CLIENT, torch.randn(1, 3, 4) * 1e-30)
    _same(grad, decode(encode(grad)))


def test_non_contiguous_tensors_are_sent_as_values():
    t = torch.randn(4, 6, 3).transpose(0, 1)
    back = decode(encode(GradientMsg(0, 0, TO_SERVER, t)))
    assert torch.equal(back.grad, t)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:5],
        lambda b: b[:4] + struct.pack(">H", 99) + b[6:],
        lambda b: b[:11] + b"#" + b[12:],
        lambda b: b[:-3],
        lambda b: b"",
    ],
)
def test_malformed_messages_are_rejected(mangle):
    data = encode(GradientMsg(0, 0, TO_SERVER, torch.randn(1, 2, 3)))
    with pytest.raises(ProtocolError) as err:
        decode(mangle(data))
    assert "\n" not in str(err.value)


def test_bad_direction_is_rejected():
    with pytest.raises(ProtocolError, match="direction"):
        GradientMsg(0, 0, "sideways", torch.zeros(1))


def test_transport_moves_bytes_in_order_and_taps_see_all():
    transport = InProcessTransport()
    rec = Recorder()
    transport.add_tap(rec)
    transport.send("client/0", "server", b"one")
    transport.send("client/0", "server", b"two")
    transport.send("client/1", "server", b"three")
    assert transport.recv("server", "client/1") == b"three"
    assert transport.recv("server", "client/0") == b"one"
    assert transport.recv("server", "client/0") == b"two"
    assert [f.data for f in rec.frames] == [b"one", b"two", b"three"]
    assert rec.frames[0] == Frame("client/0", "server", b"one")
    with pytest.raises(ProtocolError, match="none was sent"):
        transport.recv("server", "client/0")
    with pytest.raises(TypeError):
        transport.send("a", "b", "not bytes")
