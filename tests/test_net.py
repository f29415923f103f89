"""Client and server as separate processes over gRPC with mutual TLS, on loopback only."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc  # a dependency: a broken install fails here instead of skipping the mTLS tests
import pytest
import torch

from suite.cli import _config_from_args, build_parser
from suite.engine.split import SplitSpec
from suite.engine.training import train
from suite.errors import SplitleakError
from suite.experiment.prepared import prepare
from suite.net.certs import load_identity, make_certs
from suite.net.link import Link, LinkError, RemoteTransport
from suite.net.parties import build_service, config_hash
from suite.net.server import start_server
from suite.net.tap import WireTap, negotiated_version, tls_records

ARGS = ["--model", "tiny-llama", "-k", "1", "-m", "1", "--clients", "2", "--batch-size", "2", "--max-length", "12",
        "--private-size", "12"]


def _cfg(*extra: str):
    return _config_from_args(build_parser().parse_args(["train", *ARGS, *extra]))


def _in_process_losses(*extra: str) -> list[list[float]]:
    cfg = _cfg(*extra)
    prepared = prepare(cfg, SplitSpec(1, 1))
    train(prepared.session)
    return [list(col) for col in zip(*prepared.session.losses, strict=True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _splitleak(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "suite.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _losses(proc: subprocess.Popen, timeout: float = 240) -> tuple[list[float], str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("losses:"))
    return [float(x) for x in line.split()[1:]], out


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), clients=2)


@pytest.fixture
def server_proc(certs, tmp_path):
    procs = []

    def start(*extra: str, port: int | None = None):
        port = port or _free_port()
        proc = _splitleak("serve", *ARGS, *extra, "--certs", str(certs), "--listen", f"127.0.0.1:{port}",
                          "--checkpoint", str(tmp_path / "ck"), "--turn-timeout", "3", "--round-timeout", "10")
        procs.append(proc)
        return proc, port

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.parametrize("strategy", ["per_client", "batch_parallel"])
def test_two_clients_and_a_server_train_like_the_in_process_run(certs, server_proc, tmp_path, strategy):
    extra = ("--strategy", strategy, "--steps", "4")
    _, port = server_proc(*extra)
    clients = [_splitleak("client", *ARGS, *extra, "--certs", str(certs), "--server", f"127.0.0.1:{port}",
                          "--id", str(i), "--checkpoint", str(tmp_path / "ck")) for i in range(2)]
    remote = [_losses(c)[0] for c in clients]
    expected = _in_process_losses(*extra)
    for got, want in zip(remote, expected, strict=True):
        assert len(got) == 4
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_a_client_killed_with_sigkill_rejoins_and_finishes(certs, server_proc, tmp_path):
    extra = ("--strategy", "per_client", "--steps", "30")
    _, port = server_proc(*extra)
    cmd = ["client", *ARGS, *extra, "--certs", str(certs), "--server", f"127.0.0.1:{port}",
           "--checkpoint", str(tmp_path / "ck")]
    other = _splitleak(*cmd, "--id", "1")
    victim = _splitleak(*cmd, "--id", "0")
    ckpt = tmp_path / "ck" / "client-0.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    assert victim.poll() is None, "the client finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    again, out = _losses(_splitleak(*cmd, "--id", "0"))
    theirs, _ = _losses(other)
    expected = _in_process_losses(*extra)
    assert "resumed from step" in out
    resumed = int(out.split("resumed from step ")[1].split()[0])
    assert 1 <= resumed < 30 and len(again) == 30
    # Everything up to the checkpoint is the in-process trajectory; the other client never noticed.
    torch.testing.assert_close(torch.tensor(again[:resumed]), torch.tensor(expected[0][:resumed]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(expected[1]), rtol=1e-5, atol=1e-5)


def test_a_server_restart_keeps_the_clients_progress(certs, server_proc, tmp_path):
    extra = ("--strategy", "serial", "--steps", "30")
    server, port = server_proc(*extra)
    clients = [_splitleak("client", *ARGS, *extra, "--certs", str(certs), "--server", f"127.0.0.1:{port}",
                          "--id", str(i), "--checkpoint", str(tmp_path / "ck")) for i in range(2)]
    ckpt = tmp_path / "ck" / "server.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    server.send_signal(signal.SIGKILL)
    server.communicate()
    again, _ = server_proc(*extra, port=port)  # same port, same checkpoint directory
    reconnects = 0
    for c in clients:
        losses, out = _losses(c)
        assert len(losses) == 30 and all(x == x for x in losses)
        reconnects += int(out.split(" reconnects")[0].rsplit(" ", 1)[-1])
    assert reconnects >= 1  # they noticed the restart and carried on
    again.kill()
    assert "restored from" in again.communicate()[1]


def _serve_in_thread(certs, *extra: str):
    cfg = _cfg(*extra)
    service = build_service(cfg)
    server, port = start_server(service, load_identity(certs, "server"), "127.0.0.1:0")
    return cfg, service, server, port


def test_a_client_without_a_valid_certificate_is_refused(certs, tmp_path):
    cfg, _, server, port = _serve_in_thread(certs, "--steps", "1")
    try:
        good = load_identity(certs, "client-0")
        # no client certificate at all: the TLS handshake fails, nothing reaches the service
        anonymous = Link(f"127.0.0.1:{port}", good, timeout=3)
        anonymous.channel.close()
        anonymous.credentials = grpc.ssl_channel_credentials(good.ca)
        anonymous._open()
        with pytest.raises(LinkError, match="server refused this client's certificate") as err:
            RemoteTransport(anonymous, 0, config_hash(cfg)).connect(hello_timeout=3)
        assert not err.value.transient
        # a certificate from another CA: one clear, final line at once, not DEADLINE_EXCEEDED after the
        # whole retry budget (run_client retries transient errors for give_up_after = 300 s)
        from suite.net.parties import run_client

        other_dir = make_certs(tmp_path / "other", clients=1)
        other = load_identity(other_dir, "client-0")
        stranger = Link(f"127.0.0.1:{port}", type(good)(good.ca, other.cert, other.key), timeout=3)
        with pytest.raises(LinkError, match="server refused this client's certificate.*--certs DIR/client-") as err:
            RemoteTransport(stranger, 0, config_hash(cfg)).connect(hello_timeout=60)
        assert not err.value.transient and "DEADLINE_EXCEEDED" not in str(err.value)
        (tmp_path / "mixed").mkdir()  # the whole client, as `splitleak client` runs it, with its retries
        for name, data in (("ca.pem", good.ca), ("client-0.pem", other.cert), ("client-0.key", other.key)):
            (tmp_path / "mixed" / name).write_bytes(data)
        start = time.monotonic()
        with pytest.raises(LinkError, match="server refused this client's certificate"):
            run_client(cfg, 0, f"127.0.0.1:{port}", tmp_path / "mixed")
        assert time.monotonic() - start < 30  # at once, well inside the 300 s retry budget
        # and a client that does not trust the server's certificate (another CA's ca.pem) is told that
        distrust = Link(f"127.0.0.1:{port}", type(good)(other.ca, good.cert, good.key), timeout=3)
        with pytest.raises(LinkError, match="does not accept the server's certificate"):
            RemoteTransport(distrust, 0, config_hash(cfg)).connect(hello_timeout=60)
        # a valid certificate of client 1 claiming to be client 0
        with pytest.raises(LinkError, match="PERMISSION_DENIED.*certificate is client-1"):
            RemoteTransport(Link(f"127.0.0.1:{port}", load_identity(certs, "client-1")), 0,
                            config_hash(cfg)).connect(hello_timeout=3)
        # a client built from another config is told so, in one line
        with pytest.raises(LinkError, match="different experiment configs"):
            RemoteTransport(Link(f"127.0.0.1:{port}", good), 0, "another").connect(hello_timeout=3)
    finally:
        server.stop(grace=0)


def test_an_eavesdropper_on_the_socket_sees_only_tls_records(certs):
    _, service, server, port = _serve_in_thread(certs, "--strategy", "per_client", "--steps", "2")
    tap = WireTap(("127.0.0.1", port))
    try:
        runs = [_splitleak("client", *ARGS, "--strategy", "per_client", "--steps", "2", "--certs", str(certs),
                           "--server", f"127.0.0.1:{tap.port}", "--id", str(i)) for i in range(2)]
        for r in runs:
            assert len(_losses(r)[0]) == 2
    finally:
        tap.close()
        server.stop(grace=0)
    up, down = bytes(tap.to_server), bytes(tap.to_client)
    assert len(up) > 10_000 and len(down) > 10_000  # activations and gradients did cross this socket
    kinds = {kind for kind, _, _ in tls_records(up) + tls_records(down)}  # every byte is part of a TLS record
    assert kinds <= {"handshake", "change_cipher_spec", "application_data", "alert"}
    assert negotiated_version(down) == "TLSv1.3"
    for marker in (b"SPLK", b"SPLE", b"client/0", b"activation", b"\"dtype\""):
        assert marker not in up and marker not in down


def test_bad_client_input_is_a_one_line_error(certs, tmp_path):
    from suite.net.parties import run_client

    with pytest.raises(SplitleakError, match="not a client of this config"):
        run_client(_cfg("--steps", "1"), 5, "127.0.0.1:1", certs)
    with pytest.raises(SplitleakError, match="splitleak certs"):
        run_client(_cfg("--steps", "1"), 0, "127.0.0.1:1", tmp_path / "nowhere")


def test_the_config_hash_survives_a_round_trip_and_ignores_steps_and_matrix():
    from suite.experiment.config import parse_config

    built = parse_config({"model": {"name": "tiny-llama"}, "data": {"max_length": 12},
                          "training": {"clients": 2, "batch_size": 2, "steps": 3}})
    again = parse_config(built.model_dump())
    assert config_hash(built) == config_hash(again)
    other = built.model_dump()
    other["training"]["steps"] = 99
    other["matrix"]["splits"] = [4]
    other["executor"]["cpus_per_task"] = 2
    assert config_hash(parse_config(other)) == config_hash(built)
    other["training"]["lr"] = 0.5
    assert config_hash(parse_config(other)) != config_hash(built)
