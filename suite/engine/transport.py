"""Moving bytes between parties.

A ``Transport`` moves opaque byte strings between named endpoints ("server", "client/0", …). The in-process
transport keeps one FIFO queue per (sender, receiver) pair, so even a single-process run carries exactly the
bytes a network would; taps see every frame as it is sent, which is what an eavesdropper observes and what
tests use to check the wire. Defences such as encryption wrap a transport and transform the bytes.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from suite.errors import ProtocolError

SERVER = "server"


def client_endpoint(client_id: int) -> str:
    return f"client/{client_id}"


@dataclass(frozen=True)
class Frame:
    """One message as it travels: who sent it, to whom, and the bytes on the wire."""

    src: str
    dst: str
    data: bytes


Tap = Callable[[Frame], None]


class Transport(Protocol):
    def send(self, src: str, dst: str, data: bytes) -> None: ...

    def recv(self, dst: str, src: str) -> bytes: ...

    def add_tap(self, tap: Tap) -> None: ...

    def remove_tap(self, tap: Tap) -> None: ...


class Tapped:
    """The taps a transport shows its frames to, and the bytes it has sent: what every transport shares."""

    def __init__(self) -> None:
        self._taps: list[Tap] = []
        self.bytes_sent = 0

    def add_tap(self, tap: Tap) -> None:
        self._taps.append(tap)

    def remove_tap(self, tap: Tap) -> None:
        self._taps.remove(tap)

    def _show(self, src: str, dst: str, data: bytes) -> None:
        for tap in self._taps:
            tap(Frame(src, dst, data))


class InProcessTransport(Tapped):
    """FIFO queues per (src, dst). ``recv`` with nothing queued is a protocol error, not a hang: in one
    process every message must have been sent before it is read."""

    def __init__(self) -> None:
        super().__init__()
        self._queues: dict[tuple[str, str], deque[bytes]] = defaultdict(deque)

    def send(self, src: str, dst: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"transports move bytes, not {type(data).__name__}")
        data = bytes(data)
        self._show(src, dst, data)
        self.bytes_sent += len(data)
        self._queues[(src, dst)].append(data)

    def recv(self, dst: str, src: str) -> bytes:
        queue = self._queues.get((src, dst))
        if not queue:
            raise ProtocolError(f"{dst} expected a message from {src} but none was sent")
        return queue.popleft()

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())


class Recorder:
    """A tap that keeps every frame (an eavesdropper's capture, or a test's)."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def __call__(self, frame: Frame) -> None:
        self.frames.append(frame)
