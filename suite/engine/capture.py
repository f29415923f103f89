"""Capture files: the messages of a split-learning run, as they crossed the split, for attacks after the fact.

``splitleak client --capture FILE`` writes one (its own messages in both directions, and its own batches);
``splitleak serve --capture FILE`` writes the server's view (every client's messages, no batches);
``splitleak attack --capture FILE`` runs an inversion attack on one. Anyone can write one from another
framework's traffic (docs/network.md, "Capture files")::

    file   := b"SPLKCAP1" | u32 header_len | header (UTF-8 JSON object) | record*
    record := u8 tag | u32 body_len | body                 (integers big-endian)
    tag b"F", a frame: u8 n | src (n bytes, UTF-8) | u8 m | dst (m bytes) | message
    tag b"T", the truth of one batch: safetensors {"input_ids": int [B, T], "attention_mask": int [B, T]}
              with metadata {"client_id": "<int>", "step": "<int>"}

``src`` / ``dst`` are ``server`` or ``client/<id>``; ``message`` is the plaintext splitleak wire message
(``suite.engine.protocol``, format version 1: the bytes the in-process transport carries and the AEAD
channel seals: ``ActivationMsg`` / ``GradientMsg``; the audit's reveals are not captured).
Frames are in the order they were sent or received. The header carries at least ``format``
(``"splitleak-capture"``), ``version`` (1), ``head_blocks``, ``tail_blocks`` and ``max_length``; optionally
``model``, ``defense`` (``{"name", "params"}``: its public parameters), ``config`` (the config hash) and
``view`` (``client`` or ``server``). Truth records are the capturing client's own private batches: a file
that holds them is as private as the data (written 0600); leave them out to hand a capture to someone else.

Every batch is padded to ``max_length`` (at most ``MAX_POSITIONS``; ``splitleak attack --capture`` refuses one
that differs from the frames' length), and a truth record's mask marks at least one real position.
Reading never runs code (no pickle), checks the magic bytes and the header before reading further, and checks
every length against the bytes left before reading it; anything malformed is one line (``CaptureError``)
naming the byte offset.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from suite.engine.transport import SERVER, Frame
from suite.errors import SplitleakError

MAGIC = b"SPLKCAP1"
VERSION = 1
FORMAT = "splitleak-capture"
FRAME, TRUTH = b"F", b"T"
MAX_HEADER = 1 << 20
REQUIRED = ("head_blocks", "tail_blocks", "max_length")
MAX_POSITIONS = 1 << 16  # a header's max_length above this is refused (attacks pad their shadow text to it)


class CaptureError(SplitleakError):
    """A capture file that is not one, or is malformed."""


@dataclass
class CaptureFile:
    header: dict[str, Any]
    frames: list[Frame] = field(default_factory=list)
    truth: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _endpoint_ok(name: str) -> bool:
    return name == SERVER or (name.startswith("client/") and name[7:].isdigit() and len(name) <= 20)


class CaptureWriter:
    """Appends records to a capture file created 0600 (never through a link that was there). Thread-safe:
    the server's handlers write from several threads."""

    def __init__(self, path: str | Path, header: dict[str, Any]):
        header = {"format": FORMAT, "version": VERSION, **header}
        missing = [k for k in REQUIRED if k not in header]
        if missing:
            raise CaptureError(f"a capture header needs {missing}")
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as err:
            raise CaptureError(f"cannot write capture {path}: {err.strerror or err}") from None
        os.fchmod(fd, 0o600)  # also when the file was there before, with a wider mode
        self._fh = os.fdopen(fd, "wb", buffering=0)  # every record on disk as written (a killed server's too)
        self._lock = threading.Lock()
        raw = json.dumps(header, sort_keys=True).encode()
        self._fh.write(MAGIC + struct.pack(">I", len(raw)) + raw)

    def _record(self, tag: bytes, body: bytes) -> None:
        with self._lock:
            self._fh.write(tag + struct.pack(">I", len(body)) + body)

    def frame(self, src: str, dst: str, data: bytes) -> None:
        s, d = src.encode(), dst.encode()
        self._record(FRAME, bytes([len(s)]) + s + bytes([len(d)]) + d + bytes(data))

    def truth(self, client_id: int, step: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        tensors = {"input_ids": input_ids.detach().to("cpu", torch.int64).contiguous(),
                   "attention_mask": attention_mask.detach().to("cpu", torch.int64).contiguous()}
        self._record(TRUTH, st_save(tensors, metadata={"client_id": str(client_id), "step": str(step)}))

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class CapturingTransport:
    """Wraps a transport: every plaintext message sent or received through it is written as a frame (before
    any channel seals it, after any channel opened it)."""

    def __init__(self, inner, writer: CaptureWriter):
        self.inner, self.writer = inner, writer

    def send(self, src: str, dst: str, data: bytes) -> None:
        self.writer.frame(src, dst, data)
        self.inner.send(src, dst, data)

    def recv(self, dst: str, src: str) -> bytes:
        data = self.inner.recv(dst, src)
        self.writer.frame(src, dst, data)
        return data

    def add_tap(self, tap) -> None:
        self.inner.add_tap(tap)

    def remove_tap(self, tap) -> None:
        self.inner.remove_tap(tap)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def read_capture(path: str | Path, max_bytes: int = 8 << 30) -> CaptureFile:
    """Parse a capture file (module docstring); ``CaptureError`` names what is wrong and where. The magic bytes
    and the header are read and checked first, then the records one by one (a file that is not a capture is
    refused after 8 bytes, whatever its size)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if fh.read(8) != MAGIC:
                raise CaptureError(f"{path} is not a splitleak capture (it does not start with {MAGIC!r}); see the "
                                   "docs/network.md, 'Capture files'")
            if size > max_bytes:
                raise CaptureError(f"capture {path} is larger than {max_bytes} bytes")
            return _read_records(fh, size, f"capture {path}")
    except OSError as err:
        raise CaptureError(f"cannot read capture {path}: {err.strerror or err}") from None


def _read_records(fh, size: int, where: str) -> CaptureFile:
    raw = fh.read(4)
    if len(raw) < 4:
        raise CaptureError(f"{where} is truncated in its header")
    (n,) = struct.unpack(">I", raw)
    if n > MAX_HEADER or 12 + n > size:
        raise CaptureError(f"{where}: header length {n} exceeds the file or {MAX_HEADER} bytes")
    try:
        header = json.loads(fh.read(n))
    except ValueError as err:
        raise CaptureError(f"{where}: header is not JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CaptureError(f"{where}: header must be an object with format {FORMAT!r} and version {VERSION}")
    for key in REQUIRED:
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CaptureError(f"{where}: header {key!r} must be a non-negative integer, not {value!r}")
    if header["max_length"] > MAX_POSITIONS:
        raise CaptureError(f"{where}: header max_length {header['max_length']} exceeds {MAX_POSITIONS} positions")
    out = CaptureFile(header)
    i = 12 + n
    while i < size:
        head = fh.read(5)
        if len(head) < 5:
            raise CaptureError(f"{where}: truncated record header at byte {i}")
        tag, (length,) = head[:1], struct.unpack_from(">I", head, 1)
        left = size - i - 5
        if length > left:  # checked before reading: a claimed length never allocates past the file
            raise CaptureError(f"{where}: record at byte {i} claims {length} bytes, {left} are left")
        if tag not in (FRAME, TRUTH):
            raise CaptureError(f"{where}: unknown record tag {tag!r} at byte {i}")
        body = fh.read(length)
        if len(body) != length:
            raise CaptureError(f"{where}: record at byte {i} claims {length} bytes, {len(body)} are left")
        if tag == FRAME:
            out.frames.append(_frame(body, f"{where}: frame at byte {i}"))
        else:
            key, value = _truth(body, f"{where}: truth record at byte {i}")
            out.truth[key] = value
        i += 5 + length
    return out


def _frame(body: bytes, where: str) -> Frame:
    names, p = [], 0
    for _ in range(2):
        if p >= len(body) or p + 1 + body[p] > len(body):
            raise CaptureError(f"{where}: truncated endpoint name")
        try:
            name = body[p + 1 : p + 1 + body[p]].decode()
        except UnicodeDecodeError:
            raise CaptureError(f"{where}: endpoint name is not UTF-8") from None
        if not _endpoint_ok(name):
            raise CaptureError(f"{where}: endpoint {name[:40]!r} is neither 'server' nor 'client/<id>'")
        names.append(name)
        p += 1 + body[p]
    if (names[0] == SERVER) == (names[1] == SERVER):
        raise CaptureError(f"{where}: a frame goes between the server and a client, not {names[0]} -> {names[1]}")
    return Frame(names[0], names[1], bytes(body[p:]))


def _truth(body: bytes, where: str) -> tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    try:
        tensors = st_load(bytes(body))
        (n,) = struct.unpack_from("<Q", body, 0)
        meta = json.loads(body[8 : 8 + n]).get("__metadata__", {})
        key = (int(meta["client_id"]), int(meta["step"]))
    except Exception as err:  # noqa: BLE001 — any malformation is one line
        raise CaptureError(f"{where}: not a safetensors truth record ({type(err).__name__}: {str(err)[:80]})") from None
    ids, mask = tensors.get("input_ids"), tensors.get("attention_mask")
    if set(tensors) != {"input_ids", "attention_mask"} or ids.dim() != 2 or ids.shape != mask.shape:
        raise CaptureError(f"{where}: needs input_ids and attention_mask of one [B, T] shape")
    if ids.dtype.is_floating_point or mask.dtype.is_floating_point or min(key) < 0:
        raise CaptureError(f"{where}: integer tensors and non-negative client_id / step required")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise CaptureError(f"{where}: attention_mask holds values other than 0 and 1")
    if not bool(mask.any()):
        raise CaptureError(f"{where}: attention_mask marks no real position (nothing to score)")
    return key, (ids.long(), mask.long())
