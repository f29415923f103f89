"""Messages between client and server, and their versioned byte encoding.

Wire format (version 1)::

    b"SPLK" | u16 version | u32 header length | header (UTF-8 JSON) | safetensors payload

The header carries the message kind and its metadata (client id, step, direction); the payload carries the
tensors, so decoding never runs code (no pickle) and round-trips every tensor bit for bit. A receiver
checks magic, version, kind and the exact set of tensors before building a message, that the bytes are
exactly what :func:`encode` makes of that message (no slack for smuggled or ambiguous bytes), and that the
tensors fit together (3-D hidden states and gradients; mask and positions [B, T] of integers matching the
hidden states; a 0/1 mask). The integrity audit's reveal travels in the same frame as two control kinds
(:func:`encode_control`): ``reveal_request`` (client → server, no payload) and ``reveal`` (server →
client, the payload is the committed trunk state as safetensors, ``suite.engine.commitment``). A party that knows what it expects passes an :class:`Expect`: hidden size,
exact shape, row and length bounds, a bound on every position's L2 norm (the magnitude), an allow-list of
dtypes and finite values only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from suite.errors import ProtocolError

MAGIC = b"SPLK"
VERSION = 1
_PREFIX = struct.Struct(">4sHI")

TO_SERVER = "to_server"
TO_CLIENT = "to_client"
DIRECTIONS = (TO_SERVER, TO_CLIENT)


@dataclass(frozen=True)
class _Msg:
    """Base of all messages: metadata fields are ints/strs, tensor fields are ``torch.Tensor`` or None."""

    kind: ClassVar[str]
    client_id: int
    step: int
    direction: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ProtocolError(f"message direction must be one of {DIRECTIONS}, not {self.direction!r}")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


@dataclass(frozen=True)
class ActivationMsg(_Msg):
    """Hidden states crossing the split. Head → trunk carries the padding mask and positions too (they leak
    sequence lengths, see ``suite.engine.split``); trunk → tail carries hidden states only."""

    kind: ClassVar[str] = "activation"
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    # trunk -> tail, when the server commits (suite.engine.commitment): sha256 of the trunk state of this step, uint8[32]
    commitment: torch.Tensor | None = None


@dataclass(frozen=True)
class GradientMsg(_Msg):
    """Gradient of the loss with respect to the hidden states that crossed the split the other way."""

    kind: ClassVar[str] = "gradient"
    grad: torch.Tensor


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class Expect:
    """What a receiver expects of the tensors in a message (None = no constraint)."""

    hidden_size: int | None = None
    shape: tuple[int, ...] | None = None  # exact [B, T, H] (a reply to what this party sent)
    max_rows: int | None = None
    max_length: int | None = None
    max_norm: float | None = None  # largest L2 norm of one position's vector [H] (the magnitude bound)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    finite: bool = True


@dataclass(frozen=True)
class Bounds:
    """A server's bounds on what any client may send it (None = unbounded): ``rows`` (the batch size),
    ``length`` (the configured max_length) and the largest L2 norm of one position's vector of an activation
    and of a gradient (the magnitude bound; ``suite.net.server.public_bounds`` measures it on public text).
    The hidden size is always exactly the model's (``suite.engine.parties.Server.expect``)."""

    rows: int | None = None
    length: int | None = None
    activation_norm: float | None = None
    gradient_norm: float | None = None


def _check_structure(msg: _Msg) -> None:
    """Shapes and dtypes that any well-formed message has, whoever receives it."""
    for name in ("client_id", "step"):
        value = getattr(msg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"message {name} must be a non-negative integer, not {value!r}")
    main = msg.hidden if isinstance(msg, ActivationMsg) else msg.grad
    if main.dim() != 3 or main.numel() == 0:
        raise ProtocolError(f"{msg.kind} tensor must be non-empty [batch, length, hidden], got {tuple(main.shape)}")
    if not main.dtype.is_floating_point:
        raise ProtocolError(f"{msg.kind} tensor must be floating point, got {main.dtype}")
    if isinstance(msg, ActivationMsg):
        for name in ("attention_mask", "position_ids"):
            t = getattr(msg, name)
            if t is None:
                continue
            if t.dtype not in INDEX_DTYPES or tuple(t.shape) != tuple(main.shape[:2]):
                raise ProtocolError(f"{name} must be an integer [batch, length] = {tuple(main.shape[:2])} tensor, "
                                    f"got {t.dtype} {tuple(t.shape)}")
        if msg.position_ids is not None and msg.attention_mask is None:
            raise ProtocolError("position_ids without an attention_mask")
        mask = msg.attention_mask
        if mask is not None and not bool(((mask == 0) | (mask == 1)).all()):
            raise ProtocolError("attention_mask holds values other than 0 and 1")
        pos = msg.position_ids
        if pos is not None and (bool((pos < 0).any()) or bool((pos >= main.shape[1]).any())):
            raise ProtocolError(f"position_ids outside 0..{main.shape[1] - 1}")


def check(msg: _Msg, expect: Expect) -> None:
    """The receiver's policy: raise ``ProtocolError`` (one line, naming the problem) if ``msg`` is not what
    ``expect`` allows."""
    main = msg.hidden if isinstance(msg, ActivationMsg) else msg.grad
    b, t, h = main.shape
    if main.dtype not in expect.dtypes:
        raise ProtocolError(f"{msg.kind} dtype {main.dtype} is not accepted (expected one of "
                            f"{[str(d) for d in expect.dtypes]})")
    if expect.shape is not None and tuple(main.shape) != tuple(expect.shape):
        raise ProtocolError(f"{msg.kind} of shape {(b, t, h)}, expected {tuple(expect.shape)}")
    if expect.hidden_size is not None and h != expect.hidden_size:
        raise ProtocolError(f"{msg.kind} hidden size {h}, expected {expect.hidden_size}")
    if expect.max_rows is not None and b > expect.max_rows:
        raise ProtocolError(f"{msg.kind} of {b} rows exceeds the row bound: at most {expect.max_rows} (the batch size)")
    if expect.max_length is not None and t > expect.max_length:
        raise ProtocolError(f"{msg.kind} of length {t} exceeds the length bound: at most {expect.max_length} "
                            "(the configured max_length)")
    if expect.finite and not bool(torch.isfinite(main).all()):
        raise ProtocolError(f"{msg.kind} holds NaN or infinite values")
    if expect.max_norm is not None:
        worst = float(torch.linalg.vector_norm(main.float(), dim=-1).max())  # inf when the float32 sum overflows
        if not worst <= expect.max_norm:
            raise ProtocolError(f"{msg.kind} position norm {worst:.3g} exceeds the magnitude bound "
                                f"{expect.max_norm:.3g}")


MESSAGE_TYPES: dict[str, type[_Msg]] = {cls.kind: cls for cls in (ActivationMsg, GradientMsg)}
Message = ActivationMsg | GradientMsg


def encode(msg: Message) -> bytes:
    """Serialise a message to bytes (tensors are detached, copied to the host and made contiguous)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in msg.tensors().items()}
    meta = {
        f.name: getattr(msg, f.name) for f in fields(msg) if not isinstance(getattr(msg, f.name), torch.Tensor)
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    header = json.dumps({"kind": msg.kind, "meta": meta, "tensors": sorted(tensors)}, sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + st_save(tensors)


def peek(data: bytes) -> tuple[str, dict]:
    """The kind and metadata of an encoded message, without reading its tensors (for channel headers)."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"message too short ({len(data)} bytes): not a splitleak message")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("not a splitleak message of this version")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len])
        return str(header["kind"]), dict(header["meta"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed splitleak message header: {exc}") from None


def decode(data: bytes, expect: Expect | None = None, device: torch.device | str | None = None) -> Message:
    """Parse bytes produced by :func:`encode`; anything else raises ``ProtocolError``. With ``expect``, the
    message must also satisfy the receiver's policy (:func:`check`). ``device``: where the receiver computes
    (the tensors are placed there after every check; default: the CPU)."""
    msg = _decode(data)
    _check_structure(msg)
    if encode(msg) != bytes(data):
        raise ProtocolError("malformed splitleak message: not in canonical encoding (extra, altered or reordered "
                            "bytes)")
    if expect is not None:
        check(msg, expect)
    if device is not None and torch.device(device).type != "cpu":
        msg = replace(msg, **{f.name: getattr(msg, f.name).to(device) for f in fields(msg)
                              if isinstance(getattr(msg, f.name), torch.Tensor)})
    return msg


def _decode(data: bytes) -> Message:
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"message too short ({len(data)} bytes): not a splitleak message")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not a splitleak message (bad magic): is the channel encrypted on one side only?")
    if version != VERSION:
        raise ProtocolError(f"message format version {version} is not supported (this build speaks {VERSION})")
    start = _PREFIX.size
    try:
        header = json.loads(data[start : start + header_len])
        cls = MESSAGE_TYPES[header["kind"]]
        tensors = st_load(bytes(data[start + header_len :]))
        expected = {f.name for f in fields(cls) if f.name not in ("client_id", "step", "direction")}
        if set(tensors) != set(header["tensors"]) or not set(tensors) <= expected:
            raise ValueError(f"tensor fields {sorted(tensors)} do not match the header")
        if not set(header["meta"]) <= {"client_id", "step", "direction"}:
            raise ValueError(f"unknown metadata {sorted(header['meta'])}")
        return cls(**header["meta"], **tensors)
    except ProtocolError:
        raise
    except Exception as exc:  # malformed JSON, safetensors or fields: one clear error
        raise ProtocolError(f"malformed splitleak message: {exc}") from None


# --- control messages: the integrity audit's reveal ---------------------------------------------------------

REVEAL_REQUEST = "reveal_request"  # client -> server: reveal the trunk state committed to in this step's reply
REVEAL = "reveal"  # server -> client: that state (safetensors bytes, ``suite.engine.commitment.encode_reveal``)
# Between pipeline stages in separate processes (``suite.net.stages``): one pass's frames, one per client, down
# the chain (``stage_pass``) and the frames that come back (``stage_reply``); the payload is ``pack_frames``.
STAGE_PASS = "stage_pass"
STAGE_REPLY = "stage_reply"
CONTROL_KINDS = {REVEAL_REQUEST: TO_SERVER, REVEAL: TO_CLIENT, STAGE_PASS: TO_SERVER, STAGE_REPLY: TO_CLIENT}


def encode_control(kind: str, client_id: int, step: int, payload: bytes = b"") -> bytes:
    """A control message in the frame of :func:`encode` (so the channel seals it and :func:`peek` reads it):
    header ``{"kind", "meta": {client_id, step, direction}, "tensors": []}``, then ``payload`` as it is."""
    if kind not in CONTROL_KINDS:
        raise ProtocolError(f"unknown control message kind {kind!r}")
    meta = {"client_id": client_id, "step": step, "direction": CONTROL_KINDS[kind]}
    header = json.dumps({"kind": kind, "meta": meta, "tensors": []}, sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + bytes(payload)


def decode_control(data: bytes, kind: str, max_payload: int | None = None) -> tuple[int, int, bytes]:
    """(client id, step, payload) of a control message of ``kind``; anything else (another kind, a wrong
    direction, non-canonical bytes, a request with a payload, a payload over ``max_payload``) raises
    ``ProtocolError``."""
    got, meta = peek(data)
    if got != kind or kind not in CONTROL_KINDS:
        raise ProtocolError(f"expected a {kind} message, got {got!r}")
    client_id, step = meta.get("client_id"), meta.get("step")
    for name, value in (("client_id", client_id), ("step", step)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"{kind} message {name} must be a non-negative integer, not {value!r}")
    header_len = _PREFIX.unpack_from(data)[2]
    payload = bytes(data[_PREFIX.size + header_len :])
    if encode_control(kind, client_id, step, payload) != bytes(data):
        raise ProtocolError(f"malformed {kind} message: not in canonical encoding")
    if kind == REVEAL_REQUEST and payload:
        raise ProtocolError("a reveal request carries no payload")
    if max_payload is not None and len(payload) > max_payload:
        raise ProtocolError(f"{kind} payload of {len(payload)} bytes exceeds {max_payload}")
    return client_id, step, payload
