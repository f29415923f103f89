"""Messages between client and server, and their versioned byte encoding.

Wire format (version 1)::

    b"SPLK" | u16 version | u32 header length | header (UTF-8 JSON) | safetensors payload

The header carries the message kind and its metadata (client id, step, direction); the payload carries the
tensors, so decoding never runs code (no pickle) and round-trips every tensor bit for bit. A receiver
checks magic, version, kind and the exact set of tensors before building a message.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields
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
    sequence lengths, see ``suite.split``); trunk → tail carries hidden states only."""

    kind: ClassVar[str] = "activation"
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class GradientMsg(_Msg):
    """Gradient of the loss with respect to the hidden states that crossed the split the other way."""

    kind: ClassVar[str] = "gradient"
    grad: torch.Tensor


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


def decode(data: bytes, device: torch.device | str | None = None) -> Message:
    """Parse bytes produced by :func:`encode`; anything else raises ``ProtocolError``. ``device``: where the
    receiver computes (the tensors are placed there; default: the CPU)."""
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
        if device is not None and torch.device(device).type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return cls(**header["meta"], **tensors)
    except ProtocolError:
        raise
    except Exception as exc:  # malformed JSON, safetensors or fields: one clear error
        raise ProtocolError(f"malformed splitleak message: {exc}") from None
