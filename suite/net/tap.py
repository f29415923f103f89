"""An eavesdropper on a real socket: a TCP relay that records every byte between a client and the server,
and a parser that says what those bytes are (TLS records, and which TLS version was negotiated)."""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


@dataclass
class WireTap:
    """Listens on 127.0.0.1:``port`` (0 = any free port), relays to ``target`` and keeps what it relays."""

    target: tuple[str, int]
    port: int = 0
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                down, _ = self._sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(down, up, self.to_server), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, self.to_client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    log.extend(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def tls_records(stream: bytes) -> list[tuple[str, int, bytes]]:
    """Split a captured byte stream into TLS records (type, legacy version, body). Raises ``ValueError``
    at the first byte that does not start a TLS record: the stream was not (only) TLS."""
    out, i = [], 0
    while i < len(stream):
        if i + 5 > len(stream):
            raise ValueError(f"truncated TLS record header at byte {i}")
        ctype, version, length = struct.unpack_from(">BHH", stream, i)
        if ctype not in TLS_CONTENT_TYPES or version not in (0x0301, 0x0302, 0x0303):
            raise ValueError(f"byte {i} does not start a TLS record (type {ctype}, version {version:#06x})")
        out.append((TLS_CONTENT_TYPES[ctype], version, stream[i + 5 : i + 5 + length]))
        i += 5 + length
    return out


def negotiated_version(server_stream: bytes) -> str:
    """The TLS version the ServerHello chose: its supported_versions extension (0x002b) says 1.3."""
    for ctype, _, body in tls_records(server_stream):
        if ctype != "handshake" or not body or body[0] != 2:  # ServerHello
            continue
        p = 4 + 2 + 32  # handshake header, legacy version, random
        p += 1 + body[p]  # session id
        p += 2 + 1  # cipher suite, compression
        end = p + 2 + struct.unpack_from(">H", body, p)[0]
        p += 2
        while p + 4 <= end:
            ext, n = struct.unpack_from(">HH", body, p)
            if ext == 0x002B and n == 2:
                return {0x0304: "TLSv1.3", 0x0303: "TLSv1.2"}.get(struct.unpack_from(">H", body, p + 4)[0], "unknown")
            p += 4 + n
        return "TLSv1.2"  # no supported_versions: the legacy version field rules
    raise ValueError("no ServerHello in the captured stream")
