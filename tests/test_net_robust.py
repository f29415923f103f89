"""A malformed message over gRPC with batch_parallel: the sender is told why and dropped, the round goes on
with the others, and nothing wedges."""

import threading
import time

import grpc  # a dependency: no skip
import pytest
import torch

from suite.cli import _config_from_args, build_parser
from suite.engine.protocol import TO_SERVER, ActivationMsg, GradientMsg, decode, encode
from suite.engine.transport import SERVER
from suite.net.certs import load_identity, make_certs
from suite.net.link import Link, LinkError, RemoteTransport
from suite.net.parties import build_service, config_hash, run_client
from suite.net.server import start_server

ARGS = ["--model", "tiny-llama", "-k", "1", "-m", "1", "--clients", "4", "--batch-size", "2", "--max-length", "12",
        "--private-size", "16", "--strategy", "batch_parallel", "--steps", "3"]
ROUND_TIMEOUT = 300.0


def _act(client: int, hidden: torch.Tensor) -> bytes:
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    return encode(ActivationMsg(client, 0, TO_SERVER, hidden, mask, torch.arange(hidden.shape[1]).expand_as(mask)))


def test_a_bad_client_is_dropped_and_the_round_goes_on(tmp_path):
    assert grpc is not None
    certs = make_certs(tmp_path / "certs", clients=4)
    cfg = _config_from_args(build_parser().parse_args(["train", *ARGS]))
    service = build_service(cfg, round_timeout=ROUND_TIMEOUT)
    server, port = start_server(service, load_identity(certs, "server"), "127.0.0.1:0")
    address = f"127.0.0.1:{port}"
    runs, errors = {}, {}

    def honest(i: int) -> None:
        runs[i] = run_client(cfg, i, address, certs)

    def connect(i: int) -> RemoteTransport:
        transport = RemoteTransport(Link(address, load_identity(certs, f"client-{i}")), i, config_hash(cfg))
        transport.connect()
        return transport

    def bad_activation() -> None:  # hidden size 7 instead of the model's 64
        t = connect(2)
        t.send("client/2", SERVER, _act(2, torch.randn(2, 12, 7)))
        with pytest.raises(LinkError) as err:
            t.recv("client/2", SERVER)
        errors[2] = str(err.value)

    def bad_gradient() -> None:  # a good activation, then a gradient full of NaN
        t = connect(3)
        t.send("client/3", SERVER, _act(3, torch.randn(2, 12, 64)))
        hidden = decode(t.recv("client/3", SERVER)).hidden
        t.send("client/3", SERVER, encode(GradientMsg(3, 0, TO_SERVER, torch.full_like(hidden, float("nan")))))
        with pytest.raises(LinkError) as err:
            t.recv("client/3", SERVER)
        errors[3] = str(err.value)

    start = time.monotonic()
    threads = [threading.Thread(target=honest, args=(i,)) for i in (0, 1)]
    threads += [threading.Thread(target=bad_activation), threading.Thread(target=bad_gradient)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=ROUND_TIMEOUT + 60)
        elapsed = time.monotonic() - start
    finally:
        server.stop(grace=0)
    assert "INVALID_ARGUMENT" in errors[2] and "hidden size 7, expected 64" in errors[2]
    assert "INVALID_ARGUMENT" in errors[3] and "NaN" in errors[3]
    for i in (0, 1):  # the honest clients trained every step, without waiting out a round timeout
        assert len(runs[i].losses) == 3 and all(x == x for x in runs[i].losses)
    assert elapsed < ROUND_TIMEOUT
    assert sum("dropped from batch_parallel" in e for e in service.events) == 2
    assert service.round.state == "collecting" and not service.round.arrived  # idle, not wedged


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self, version: bytes):
        self._auth = {"ssl_tls_version": [version], "x509_common_name": [b"client-0"]}
        self.aborted = None

    def auth_context(self):
        return self._auth

    def abort(self, code, details):
        self.aborted = (code, details)
        raise _Aborted(details)


@pytest.mark.parametrize("version", [b"TLSv1.2", b"TLSv1.1", b""])
def test_calls_over_anything_but_tls_1_3_are_refused(version):
    from suite.net.server import SplitService

    cfg = _config_from_args(build_parser().parse_args(["train", *ARGS]))
    service = SplitService.__new__(SplitService)  # only _who is exercised: no model needed
    service.clients = cfg.training.clients
    ctx = _Context(version)
    with pytest.raises(_Aborted, match="requires TLS 1.3"):
        service._who(ctx)
    assert ctx.aborted[0] == grpc.StatusCode.PERMISSION_DENIED
    assert service._who(_Context(b"TLSv1.3")) == 0


def test_a_tls_1_2_client_completes_no_call(tmp_path):
    """A real TLS 1.2 connection (Python's ssl, capped at 1.2) to the running service: the handshake
    completes (gRPC cannot forbid it), the HTTP/2 call on it is answered with PERMISSION_DENIED."""
    import socket
    import ssl

    import h2.connection  # the test extra: speaks HTTP/2 by hand

    h2 = h2.connection
    certs = make_certs(tmp_path / "certs", clients=1)
    cfg = _config_from_args(build_parser().parse_args(["train", *ARGS, "--clients", "1"]))
    service = build_service(cfg)
    server, port = start_server(service, load_identity(certs, "server"), "127.0.0.1:0")
    try:
        ctx = ssl.create_default_context(cafile=str(certs / "client-0" / "ca.pem"))
        ctx.load_cert_chain(certs / "client-0" / "client-0.pem", certs / "client-0" / "client-0.key")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() == "TLSv1.2"
            conn = h2.H2Connection()
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":path", "/splitleak.v1.Split/Hello"),
                                  (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")])
            body = b'{"client_id": 0, "config": "x"}'
            conn.send_data(1, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
            s.sendall(conn.data_to_send())
            status = None
            while status is None:
                for event in conn.receive_data(s.recv(65536)):
                    headers = dict(getattr(event, "headers", None) or [])
                    status = headers.get(b"grpc-status", status)
                s.sendall(conn.data_to_send())
        assert status == b"7"  # PERMISSION_DENIED
    finally:
        server.stop(grace=0)


@pytest.mark.parametrize("encoding", ["bit_255_flipped", "u_at_least_p"])
def test_a_non_canonical_x25519_key_is_refused_and_the_victims_channel_survives(encoding):
    """A replayed handshake whose X25519 key is another encoding of a key (bit 255 flipped: the victim's
    own key; or u + p, here of the base point 9), with a fresh client nonce and the current challenge, is
    refused with a clear error, and the victim's channel goes on."""
    import os

    from suite.engine.channel import ClientEnd, IntegrityError, ServerEnd, ServerKeys, _frame, _unframe

    server = ServerEnd(ServerKeys("x25519"))
    victim = ClientEnd("client/0", server.public_for("client/0"))
    server.accept("client/0", victim.handshake)
    header, _, key = _unframe(victim.handshake)
    if encoding == "bit_255_flipped":
        other = key[:31] + bytes([key[31] ^ 0x80])
    else:
        other = (2**255 - 19 + 9).to_bytes(32, "little")
    forged = _frame({**header, "server_nonce": server.public_for("client/0")["challenge"],
                     "client_nonce": os.urandom(16).hex()}, other)
    with pytest.raises(IntegrityError, match="X25519 public key is not canonical"):
        server.accept("client/0", forged)
    msg = _act(0, torch.randn(1, 3, 8))
    assert server.open("client/0", victim.seal(msg)) == msg  # the victim's channel survived
    assert victim.open(server.seal("client/0", msg)) == msg
