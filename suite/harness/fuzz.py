"""Fuzzing the receiving end of the protocol: the secure channel (``suite.engine.channel``) and the message decoder
(``suite.engine.protocol``), driven the way the server drives them (``suite.engine.parties.Server._recv``).

Every case is a frame the server must refuse. Two families:

* **On the wire** (an outsider, or a TLS-terminating proxy, without client 0's keys), built from a genuine
  frame sealed for the server's next expected counter: bit flips, truncation, extension, byte insertion and
  deletion, a rewritten clear header (counter, step, kind, client, session), a frame from later in the stream
  (reordered), a frame already accepted (replayed), a frame under another client's or another session's key
  (wrong key), and a replayed handshake (verbatim, after a fresh challenge, or with its challenge rewritten).
* **From inside the channel** (a malicious client holding the keys, sealing whatever it likes at the right
  counter): mutated and truncated message headers and safetensors headers, wrong hidden size, dtype, rank or
  batch/length agreement between hidden states and mask, a mask that is not 0/1, positions out of range, NaN
  or infinite values, a position whose norm breaks the magnitude bound, more rows or positions than the
  server's bounds, extra tensors, the wrong kind, step, client or direction. Flips in the tensor *values*
  of an otherwise valid message within the bounds are not in this family: such a message is a valid
  message, which an insider may always send.

A case "reached the model" when the receive path returned a message for the trunk. Between cases the
harness delivers genuine frames as controls and checks they are accepted, so a receiver that refuses
everything fails the run instead of passing it.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from suite.engine.channel import (
    ClientEnd,
    IntegrityError,
    ServerEnd,
    ServerKeys,
    _Channel,
    _frame,
    _seal,
    _unframe,
)
from suite.engine.protocol import (
    TO_CLIENT,
    TO_SERVER,
    ActivationMsg,
    Expect,
    GradientMsg,
    decode,
    encode,
    peek,
)
from suite.engine.transport import SERVER
from suite.errors import ProtocolError

HIDDEN, ROWS, LENGTH = 16, 2, 6
NORM = 1000.0  # the receiver's magnitude bound (genuine positions have norms near 4)
ME, OTHER = "client/0", "client/1"

WIRE_KINDS = ("bitflip", "truncate", "extend", "insert_delete", "header_rewrite", "reorder", "replay",
              "wrong_key_client", "wrong_key_session", "handshake_replay")
INSIDER_KINDS = ("msg_header_flip", "msg_truncate", "tensor_header_flip", "hidden_size", "dtype", "rank",
                 "mask_shape", "mask_values", "positions", "non_finite", "extra_tensor", "wrong_kind",
                 "wrong_step", "wrong_client", "wrong_direction", "magnitude", "rows", "length")


@dataclass
class FuzzResult:
    cases: int = 0
    rejected: int = 0
    reached: int = 0
    controls: int = 0  # genuine frames delivered between cases
    controls_accepted: int = 0
    seconds: float = 0.0
    by_kind: Counter = field(default_factory=Counter)  # kind -> cases
    reached_kinds: Counter = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)  # kind -> the first rejection message

    def summary(self) -> str:
        return (f"fuzz: {self.cases} cases ({len(self.by_kind)} kinds), {self.rejected} rejected, {self.reached} "
                f"reached the model; {self.controls_accepted}/{self.controls} genuine control frames accepted; "
                f"{self.seconds:.1f} s")


class _Receiver:
    """The server's receive path for client 0's activations: channel, decoder with the trunk's policy, and
    the protocol checks of ``Server._recv``."""

    def __init__(self):
        self.server = ServerEnd(ServerKeys())
        self.step = 0

    def receive(self, frame: bytes) -> ActivationMsg:
        plain = self.server.open(ME, frame)
        msg = decode(plain, Expect(hidden_size=HIDDEN, max_rows=ROWS, max_length=LENGTH, max_norm=NORM))
        if (not isinstance(msg, ActivationMsg) or msg.client_id != 0 or msg.step != self.step
                or msg.direction != TO_SERVER):
            raise ProtocolError(f"expected client 0's activation for step {self.step}")
        return msg

    @property
    def seq(self) -> int:
        return self.server.channels[ME].expected["to_server"]


@functools.lru_cache(maxsize=4)
def _good_bytes(step: int) -> bytes:
    return encode(_good(step))


def _good(step: int, client: int = 0, **change) -> ActivationMsg:
    g = torch.Generator().manual_seed(step)
    mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    mask[0, LENGTH - 2 :] = 0
    fields = {"hidden": torch.randn(ROWS, LENGTH, HIDDEN, generator=g), "attention_mask": mask,
              "position_ids": torch.arange(LENGTH).expand(ROWS, LENGTH).contiguous()}
    fields.update(change)
    return ActivationMsg(client, step, TO_SERVER, **fields)


def _seal_at(end: ClientEnd, seq: int, plain: bytes, step: int = 0) -> bytes:
    """Seal ``plain`` with ``end``'s keys at counter ``seq`` (what a key holder can always do). A plaintext
    that is not even a message gets the clear header of a genuine activation for ``step``."""
    try:
        peek(plain)
    except ProtocolError:
        header = {"session": end.session, "src": end.client, "dst": SERVER, "seq": seq, "kind": "activation",
                  "client_id": 0, "step": step}
        aad = _frame(header, b"")
        return aad + end.channel.keys["to_server"].encrypt(seq.to_bytes(12, "big"), plain, aad)
    state = _Channel(end.channel.keys, {"to_server": seq, "to_client": 0}, {"to_server": 0, "to_client": 0})
    return _seal(state, end.session, end.client, SERVER, "to_server", plain)


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, flips: int | None = None) -> bytes:
    out = bytearray(data)
    hi = len(out) if hi is None else hi
    for _ in range(flips or rng.randint(1, 8)):
        out[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _insider(kind: str, rng: random.Random, step: int) -> bytes:
    """A plaintext message that the receiver must refuse although it arrives under the right key."""
    good = _good_bytes(step)
    header_end = 10 + int.from_bytes(good[6:10], "big")  # SPLK | u16 | u32 | JSON header
    if kind == "msg_header_flip":
        return _flip(good, rng, 0, header_end, rng.randint(1, 3))
    if kind == "msg_truncate":
        return good[: rng.randrange(len(good))]
    if kind == "tensor_header_flip":  # the safetensors header: u64 length + JSON (dtype, shape, offsets)
        st_len = int.from_bytes(good[header_end : header_end + 8], "little")
        return _flip(good, rng, header_end, header_end + 8 + st_len, rng.randint(1, 3))
    hidden = torch.randn(ROWS, LENGTH, HIDDEN)
    if kind == "hidden_size":
        return encode(_good(step, hidden=torch.randn(ROWS, LENGTH, rng.choice([1, HIDDEN - 1, HIDDEN + 1, 4096]))))
    if kind == "dtype":
        bad = rng.choice([hidden.double(), hidden.to(torch.int32), hidden.to(torch.uint8), hidden > 0])
        return encode(_good(step, hidden=bad))
    if kind == "rank":
        return encode(_good(step, hidden=rng.choice([hidden[0], hidden.unsqueeze(0), hidden[:, :0]])))
    if kind == "mask_shape":
        mask = rng.choice([torch.ones(ROWS + 1, LENGTH, dtype=torch.long), torch.ones(ROWS, LENGTH - 1,
                                                                                      dtype=torch.long)])
        return encode(_good(step, attention_mask=mask, position_ids=None))
    if kind == "mask_values":
        mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
        mask[rng.randrange(ROWS), rng.randrange(LENGTH)] = rng.choice([-1, 2, 7, 2**40])
        return encode(_good(step, attention_mask=mask))
    if kind == "positions":
        pos = torch.arange(LENGTH).expand(ROWS, LENGTH).clone()
        pos[rng.randrange(ROWS), rng.randrange(LENGTH)] = rng.choice([-1, LENGTH, 10**9])
        return encode(_good(step, position_ids=pos))
    if kind == "non_finite":
        hidden[rng.randrange(ROWS), rng.randrange(LENGTH), rng.randrange(HIDDEN)] = rng.choice(
            [float("nan"), float("inf"), float("-inf")])
        return encode(_good(step, hidden=hidden))
    if kind == "magnitude":  # finite, but one position far beyond the bound (3e38 once poisoned the trunk)
        hidden[rng.randrange(ROWS), rng.randrange(LENGTH)] = rng.choice([1e4, 1e20, 3e38, -3e38])
        return encode(_good(step, hidden=hidden))
    if kind in ("rows", "length"):  # well-formed, but more rows or positions than the server's bounds
        rows, length = (ROWS + rng.choice([1, 62]), LENGTH) if kind == "rows" else (ROWS, LENGTH + rng.choice([1, 500]))
        mask = torch.ones(rows, length, dtype=torch.long)
        return encode(_good(step, hidden=torch.randn(rows, length, HIDDEN), attention_mask=mask,
                            position_ids=torch.arange(length).expand(rows, length).contiguous()))
    if kind == "extra_tensor":  # a tensor field the message type does not have, smuggled into the payload
        from safetensors.torch import save as st_save

        prefix = good[:header_end]
        header = json.loads(good[10:header_end])
        header["tensors"] = sorted([*header["tensors"], "payload"])
        raw = json.dumps(header, sort_keys=True).encode()
        msg = _good(step)
        tensors = {**msg.tensors(), "payload": torch.zeros(3)}
        return prefix[:6] + len(raw).to_bytes(4, "big") + raw + st_save(tensors)
    if kind == "wrong_kind":
        return encode(GradientMsg(0, step, TO_SERVER, hidden))
    if kind == "wrong_step":
        return encode(_good(rng.choice([step + 1, step + 1000, max(step - 1, 0) if step else step + 2])))
    if kind == "wrong_client":
        return encode(_good(step, client=rng.choice([1, 2, 10**6])))
    if kind == "wrong_direction":
        return encode(ActivationMsg(0, step, TO_CLIENT, hidden))
    raise ValueError(kind)


def run_fuzz(n: int, seed: int = 0, control_every: int = 50) -> FuzzResult:
    """Run ``n`` fuzz cases (seeded: the same ``seed`` gives the same cases) against a fresh receiver."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rx = _Receiver()
    me = ClientEnd(ME, rx.server.public_for(ME))
    rx.server.accept(ME, me.handshake)
    captured_handshake = me.handshake
    other = ClientEnd(OTHER, rx.server.public_for(OTHER))
    rx.server.accept(OTHER, other.handshake)
    stranger_server = ServerEnd(ServerKeys())
    stranger = ClientEnd(ME, stranger_server.public_for(ME))
    accepted: list[bytes] = []
    result = FuzzResult()
    kinds = WIRE_KINDS + INSIDER_KINDS
    start = time.perf_counter()

    def control() -> None:
        frame = _seal_at(me, rx.seq, encode(_good(rx.step)))
        result.controls += 1
        try:
            rx.receive(frame)
        except ProtocolError:
            return
        result.controls_accepted += 1
        accepted.append(frame)
        rx.step += 1

    control()
    for i in range(n):
        if i and i % control_every == 0:
            control()
        kind = kinds[rng.randrange(len(kinds))]
        genuine = _seal_at(me, rx.seq, _good_bytes(rx.step))
        if kind == "bitflip":
            frame = _flip(genuine, rng)
        elif kind == "truncate":
            frame = genuine[: rng.randrange(len(genuine))]
        elif kind == "extend":
            frame = genuine + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "insert_delete":
            at = rng.randrange(len(genuine))
            frame = (genuine[:at] + bytes([rng.randrange(256)]) + genuine[at:] if rng.random() < 0.5
                     else genuine[:at] + genuine[at + 1 :])
        elif kind == "header_rewrite":
            header, _, body = _unframe(genuine)
            key = rng.choice(["seq", "step", "kind", "client_id", "src", "session", "dst"])
            header[key] = {"seq": rx.seq + rng.randint(1, 5), "step": rx.step + 1, "kind": "gradient",
                           "client_id": 1, "src": OTHER, "session": "00" * 16, "dst": ME}[key]
            frame = _frame(header, body)
        elif kind == "reorder":
            frame = _seal_at(me, rx.seq + rng.randint(1, 3), encode(_good(rx.step + 1)))
        elif kind == "replay":
            frame = rng.choice(accepted)
        elif kind == "wrong_key_client":  # client 1's keys, relabelled as client 0's frame
            theirs = _seal_at(other, rx.seq, encode(_good(rx.step)))
            frame = theirs.replace(OTHER.encode(), ME.encode()) if rng.random() < 0.7 else theirs
        elif kind == "wrong_key_session":
            frame = _seal_at(stranger, rx.seq, encode(_good(rx.step)))
        elif kind == "handshake_replay":
            result.cases += 1
            result.by_kind[kind] += 1
            mode = rng.randrange(4)
            replay = captured_handshake
            if mode >= 1:  # the attacker first obtains a fresh challenge (a proxy relaying Hello)
                fresh = rx.server.public_for(ME)["challenge"]
                if mode == 2:  # and writes it into the old handshake
                    header, _, body = _unframe(replay)
                    replay = _frame({**header, "server_nonce": fresh}, body)
                if mode == 3:  # and a fresh client nonce, with the key's bit 255 flipped (the same X25519 key)
                    header, _, body = _unframe(replay)
                    body = body[:31] + bytes([body[31] ^ 0x80])
                    replay = _frame({**header, "server_nonce": fresh, "client_nonce": rng.randbytes(16).hex()},
                                    body)
            try:
                rx.server.accept(ME, replay)
                result.reached += 1  # a replayed handshake accepted: the channel would be reset
                result.reached_kinds[kind] += 1
            except ProtocolError as err:
                result.rejected += 1
                result.first_errors.setdefault(kind, str(err))
            rx.server.challenges.pop(ME, None)
            continue
        else:
            frame = _seal_at(me, rx.seq, _insider(kind, rng, rx.step), rx.step)
        result.cases += 1
        result.by_kind[kind] += 1
        try:
            rx.receive(frame)
        except ProtocolError as err:  # IntegrityError is a ProtocolError
            result.rejected += 1
            result.first_errors.setdefault(kind, str(err))
            continue
        result.reached += 1
        result.reached_kinds[kind] += 1
        rx.step += 1
    control()
    result.seconds = time.perf_counter() - start
    return result


__all__ = ["FuzzResult", "IntegrityError", "run_fuzz"]
