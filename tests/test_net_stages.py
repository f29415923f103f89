"""Pipeline stages as processes (``splitleak serve --stage i``): a 3-stage run over gRPC + mTLS on loopback
trains exactly what the in-process ``StageChain`` trains, and survives a kill -9 of the middle stage."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc  # a dependency: no skip
import pytest
import torch

from suite.cli import _config_from_args, build_parser
from suite.engine.protocol import STAGE_PASS, TO_SERVER, ActivationMsg, GradientMsg, encode, encode_control
from suite.engine.split import SplitSpec, position_ids_for
from suite.engine.training import train
from suite.experiment.prepared import prepare
from suite.net import checkpoint
from suite.net.certs import load_identity, make_certs
from suite.net.link import HELLO, Link, LinkError
from suite.net.parties import build_service, config_hash, run_client, stage_layout
from suite.net.server import start_server
from suite.net.stages import (
    build_stage_service,
    pack_frames,
    stage_factory,
    start_stage_server,
    unpack_frames,
)

STEPS = 10
ARGS = ["--model", "tiny-llama", "-k", "0", "-m", "1", "--clients", "1", "--batch-size", "2", "--max-length", "12",
        "--private-size", "8", "--strategy", "serial", "--stages", "3", "--steps", str(STEPS)]


def _cfg():
    return _config_from_args(build_parser().parse_args(["client", *ARGS, "--certs", "unused", "--id", "0"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), clients=1, stages=3)


def _middle(certs, port: int, next_port: int, ck) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "suite.cli", "serve", *ARGS, "--stage", "1", "--certs",
                             str(certs / "stage-1"), "--listen", f"127.0.0.1:{port}", "--next",
                             f"127.0.0.1:{next_port}", "--checkpoint", str(ck)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_three_stages_over_grpc_survive_kill_9_of_the_middle_one(certs, tmp_path):
    cfg = _cfg()
    ck = tmp_path / "ck"
    procs: list[subprocess.Popen] = []
    servers, logs = [], []
    try:
        last = build_stage_service(cfg, 2, load_identity(certs, "stage-2"), None, ck)
        server2, port2 = start_stage_server(last, load_identity(certs, "stage-2"), "127.0.0.1:0")
        servers.append(server2)
        port1 = _free_port()
        procs.append(_middle(certs, port1, port2, ck))
        ident0 = load_identity(certs, "stage-0")
        first = build_service(cfg, ck, stage=stage_factory(cfg, 0, ident0, f"127.0.0.1:{port1}", None))
        server0, port0 = start_server(first, ident0, "127.0.0.1:0")
        servers.append(server0)

        killed = threading.Event()

        def kill_and_restart() -> None:
            procs[0].send_signal(signal.SIGKILL)
            logs.append(procs[0].communicate()[1])
            killed.set()
            procs.append(_middle(certs, port1, port2, ck))

        killer = threading.Timer(0.03, kill_and_restart)  # lands while step 3's passes cross the stages

        def on_step(step: int, loss: float) -> None:
            if step == 2:
                killer.start()

        run = run_client(cfg, 0, f"127.0.0.1:{port0}", certs / "client-0", ck, on_step=on_step,
                         give_up_after=120)
        killer.join()
    finally:
        for s in servers:
            s.stop(grace=0).wait(10)
        for p in procs[len(logs):]:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # it stops cleanly (the server is stopped in a finally)
            try:
                logs.append(p.communicate(timeout=60)[1])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[1])
    assert killed.is_set() and len(procs) == 2
    assert "restored from" in logs[1], logs[1][-2000:]
    assert first.server.link.retries >= 1  # stage 0 noticed the middle stage go and come back

    # The in-process StageChain run of the same config: the same losses and the same final parameters.
    prepared = prepare(cfg, SplitSpec(0, 1))
    train(prepared.session)
    want = [row[0] for row in prepared.session.losses]
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(want), rtol=1e-5, atol=1e-6)
    client = prepared.session.clients[0]
    got = checkpoint.load(ck / "client-0.pt")["weights"]
    _same(got, checkpoint.trainable_state({"head": client.head, "tail": client.tail}))
    for i, stage in enumerate(prepared.session.server.stages):
        got = checkpoint.load(ck / f"stage-{i}.pt")["weights"]
        _same(got, checkpoint.trainable_state({"trunk": stage.trunk}))
    assert checkpoint.load(ck / "stage-1.pt")["passes"] == STEPS


def test_a_batch_parallel_round_is_one_pass_at_every_stage_and_trains_like_in_process(certs, tmp_path):
    """Two clients, ``batch_parallel``: each round crosses every link as one pass (both clients' rows in one
    trunk pass per stage), and both clients' losses are the in-process StageChain's."""
    extra = ["--clients", "2", "--strategy", "batch_parallel", "--steps", "3"]
    cfg = _config_from_args(build_parser().parse_args(["client", *ARGS, *extra, "--certs", "unused", "--id", "0"]))
    two = make_certs(tmp_path / "certs", clients=2, stages=3)
    servers = []
    try:
        last = build_stage_service(cfg, 2, load_identity(two, "stage-2"), None)
        server, port2 = start_stage_server(last, load_identity(two, "stage-2"), "127.0.0.1:0")
        servers.append(server)
        middle = build_stage_service(cfg, 1, load_identity(two, "stage-1"), f"127.0.0.1:{port2}")
        server, port1 = start_stage_server(middle, load_identity(two, "stage-1"), "127.0.0.1:0")
        servers.append(server)
        ident0 = load_identity(two, "stage-0")
        first = build_service(cfg, stage=stage_factory(cfg, 0, ident0, f"127.0.0.1:{port1}", None), round_timeout=120)
        server, port0 = start_server(first, ident0, "127.0.0.1:0")
        servers.append(server)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        other = subprocess.Popen([sys.executable, "-m", "suite.cli", "client", *ARGS, *extra, "--certs",
                                  str(two / "client-1"), "--server", f"127.0.0.1:{port0}", "--id", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            mine = run_client(cfg, 0, f"127.0.0.1:{port0}", two / "client-0").losses
            out, err = other.communicate(timeout=240)
        finally:
            if other.poll() is None:
                other.kill()
                other.communicate()
        assert other.returncode == 0, err[-2000:]
        theirs = [float(x) for x in next(ln for ln in out.splitlines() if ln.startswith("losses:")).split()[1:]]
    finally:
        for s in servers:
            s.stop(grace=0).wait(10)
    assert middle.passes == last.passes == 3  # one pass per round at every stage
    prepared = prepare(cfg, SplitSpec(0, 1))
    train(prepared.session)
    want = [list(col) for col in zip(*prepared.session.losses, strict=True)]
    torch.testing.assert_close(torch.tensor([mine, theirs]), torch.tensor(want), rtol=1e-5, atol=1e-5)


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want) and want
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_stage_serves_its_upstream_neighbour_only(certs):
    cfg = _cfg()
    service = build_stage_service(cfg, 2, load_identity(certs, "stage-2"), None)
    server, port = start_stage_server(service, load_identity(certs, "stage-2"), "127.0.0.1:0")
    try:
        for who in ("client-0", "stage-0"):  # a client, a stage that is not stage 2's neighbour
            with pytest.raises(LinkError, match="PERMISSION_DENIED.*not this stage's upstream neighbour"):
                Link(f"127.0.0.1:{port}", load_identity(certs, who), timeout=20).call(HELLO, b"{}")
        # Stage 0 pointed at stage 2 by mistake: the TLS handshake refuses a peer that is not stage-1.
        with pytest.raises(LinkError, match="does not name the expected host or stage"):
            Link(f"127.0.0.1:{port}", load_identity(certs, "stage-0"), timeout=20, peer_name="stage-1").call(HELLO,
                                                                                                            b"{}")
    finally:
        server.stop(grace=0).wait(10)


def test_a_pass_completed_before_is_answered_again_without_a_second_step(certs, tmp_path):
    """The reply to a completed pass was lost (the stage before restarted): the same pass again gets the same
    replies from the checkpoint, and the stage does not step twice; a restarted stage replays it too."""
    cfg = _cfg()
    service = build_stage_service(cfg, 2, load_identity(certs, "stage-2"), None, tmp_path)
    hidden = torch.randn(2, 12, 64)
    mask = torch.ones(2, 12, dtype=torch.long)
    act = encode(ActivationMsg(0, 0, TO_SERVER, hidden, mask, position_ids_for(mask)))
    grad = encode(GradientMsg(0, 0, TO_SERVER, torch.randn(2, 12, 64) * 1e-3))
    forward = encode_control(STAGE_PASS, 0, 0, pack_frames([(0, act)]))
    backward = encode_control(STAGE_PASS, 0, 0, pack_frames([(0, grad)]))
    replies = service.run_pass(forward), service.run_pass(backward)
    weights = checkpoint.trainable_state({"trunk": service.node.trunk})
    again = build_stage_service(cfg, 2, load_identity(certs, "stage-2"), None, tmp_path)  # restarted
    for s in (service, again):
        assert (s.run_pass(forward), s.run_pass(backward)) == replies
        assert s.node.optimizer_steps == {None: 1 if s is service else 0} and s.replays == 2
        _same(checkpoint.trainable_state({"trunk": s.node.trunk}), weights)


def test_stage_layout_is_part_of_the_agreed_hash():
    cfg = _cfg()
    prepared = prepare(cfg, SplitSpec(0, 1))
    layout = stage_layout(cfg, prepared.session.split)
    assert layout == [(0, 1), (1, 2), (2, 3)]
    assert config_hash(cfg, None, layout) != config_hash(cfg, None, [(0, 2), (2, 3), (3, 3)])
    two = cfg.model_copy(update={"training": cfg.training.model_copy(update={"stages": 2})})
    assert config_hash(two) != config_hash(cfg)


def test_frame_bundles_round_trip_and_reject_garbage():
    entries = [(0, b"abc"), (3, "stage 2: non-finite"), (5, b"")]
    assert unpack_frames(pack_frames(entries)) == entries
    for bad in (b"", b"\x00\x00\x00\x05[{}]]", pack_frames([(0, b"abc")]) + b"x"):
        with pytest.raises(Exception, match="malformed stage frame bundle"):
            unpack_frames(bad)
    assert grpc is not None


def test_dp_sgd_runs_on_every_stage_over_grpc_and_the_clients_epsilon_counts_them(certs):
    """Red team: with `serve --stage i --defense dp_sgd`, stage 0 crashed (StageNode.stages was a count) and
    stages 1..S-1 trained with plain AdamW while the client's epsilon counted them. Now every stage clips and
    noises its own trunk's adapters (each pass averaged over its own rows), and the client's epsilon is for
    S stages plus its head and tail."""
    from opacus.optimizers import DPOptimizer

    from suite.net.defended import choose_defense

    cfg = _config_from_args(build_parser().parse_args(["client", *ARGS, "--steps", "2", "--certs", "unused",
                                                       "--id", "0"]))
    params = {"sigma": 1.0, "clip": 1e-3, "target": "both"}
    dp = lambda: choose_defense(cfg, "dp_sgd", params)  # noqa: E731 (each process its own defense)
    servers, stepped = [], {}
    try:
        last = build_stage_service(cfg, 2, load_identity(certs, "stage-2"), None, defense=dp())
        server, port2 = start_stage_server(last, load_identity(certs, "stage-2"), "127.0.0.1:0")
        servers.append(server)
        middle = build_stage_service(cfg, 1, load_identity(certs, "stage-1"), f"127.0.0.1:{port2}", defense=dp())
        server, port1 = start_stage_server(middle, load_identity(certs, "stage-1"), "127.0.0.1:0")
        servers.append(server)
        ident0 = load_identity(certs, "stage-0")
        first_dp = dp()
        first = build_service(cfg, stage=stage_factory(cfg, 0, ident0, f"127.0.0.1:{port1}", first_dp),
                              defense=first_dp)
        server, port0 = start_server(first, ident0, "127.0.0.1:0")
        servers.append(server)
        for i, node in enumerate((first.server, middle.node, last.node)):
            optimizers = [o for o in node.optimizers.values() if o is not None]
            assert optimizers and all(isinstance(o, DPOptimizer) for o in optimizers), (i, optimizers)
            for o in optimizers:
                o.attach_step_hook(lambda opt, i=i: stepped.setdefault(i, []).append(
                    (opt.expected_batch_size, float(torch.cat([p.summed_grad.reshape(-1) for p in opt.params]).norm()))))
        client_dp = dp()
        run = run_client(cfg, 0, f"127.0.0.1:{port0}", certs / "client-0", defense=client_dp, give_up_after=60)
    finally:
        for s in servers:
            s.stop(grace=0).wait(10)
    assert len(run.losses) == 2 and all(torch.isfinite(torch.tensor(run.losses)))
    assert sorted(stepped) == [0, 1, 2]
    for i, steps in stepped.items():  # every stage stepped under DP-SGD, each pass over its own 2 rows, clipped
        assert len(steps) == 2 and all(rows == 2 and norm <= 2 * 1e-3 * 1.0001 for rows, norm in steps), (i, steps)
    report = run.defense_report
    assert report["clipped_parts"] == 4 and report["effective_sigma"] == pytest.approx(1.0 / 2)  # 3 stages + client


@pytest.mark.parametrize("ignored", [False, True], ids=["sigint", "sigint-ignored-at-start"])
def test_serve_stage_0_with_dp_sgd_from_the_cli_starts_and_stops_cleanly(certs, ignored):
    """`splitleak serve --stage 0 --defense dp_sgd` (target both) used to die with a raw traceback. And a serve
    started with SIGINT ignored (a background job of a non-interactive shell: CI) still stops on SIGINT: it
    used to hang there, as Python installs no handler for a signal ignored at start."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "suite.cli", "serve", *ARGS, "--stage", "0", "--certs",
                             str(certs / "stage-0"), "--listen", "127.0.0.1:0", "--next",
                             f"127.0.0.1:{_free_port()}", "--defense", "dp_sgd", "--defense-param", "target=both"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C stops" in line:
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(lines) + rest
    assert "stage 0 of 3" in err and "dp_sgd" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]


def test_stage_retry_windows_nest_around_the_stages_after_each():
    """Each stage retries for as long as the stages after it may, and waits on one call for longer than the
    next stage may hold it (its compute and its own retries), so a failure deep in the chain is retried
    where it happened instead of every stage giving up at the same moment."""
    from suite.errors import ConfigError
    from suite.net.stages import stage_windows

    w, t = 120.0, 120.0
    assert stage_windows(1, 3, w, t) == (w, t)  # the last-but-one: the plain window and call deadline
    window0, call0 = stage_windows(0, 3, w, t)
    assert window0 == 2 * w and call0 == 2 * t + w
    assert call0 >= t + w + t  # stage 1 holds stage 0's call for its compute, one call and its retry window
    windows = [stage_windows(i, 5, w, t) for i in range(4)]
    assert all(a[0] > b[0] and a[1] >= t + b[0] + b[1] for a, b in zip(windows, windows[1:], strict=False))
    with pytest.raises(ConfigError, match="is the last"):
        stage_windows(2, 3, w, t)


def _last(certs, port: int, ck) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "suite.cli", "serve", *ARGS, "--stage", "2", "--certs",
                             str(certs / "stage-2"), "--listen", f"127.0.0.1:{port}", "--checkpoint", str(ck)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_kill_9_of_the_last_of_three_stages_is_retried_by_the_stage_before_it_only(certs, tmp_path):
    """Stage 2 (the last) is killed mid-run and restarted (a new process: seconds). Stage 1 retries it;
    stage 0's call to stage 1 is held meanwhile, longer than the 3 s call deadline a flat window would have
    given it (its deadline nests around stage 1's retries), so stage 0 never retries, and the run trains
    exactly what the in-process StageChain trains."""
    cfg = _cfg()
    ck = tmp_path / "ck"
    procs: list[subprocess.Popen] = []
    servers, logs = [], []
    try:
        port2 = _free_port()
        procs.append(_last(certs, port2, ck))
        middle = build_stage_service(cfg, 1, load_identity(certs, "stage-1"), f"127.0.0.1:{port2}", ck,
                                     give_up_after=120, call_timeout=3)
        server1, port1 = start_stage_server(middle, load_identity(certs, "stage-1"), "127.0.0.1:0")
        servers.append(server1)
        ident0 = load_identity(certs, "stage-0")
        first = build_service(cfg, ck, stage=stage_factory(cfg, 0, ident0, f"127.0.0.1:{port1}", None,
                                                           give_up_after=120, call_timeout=3))
        server0, port0 = start_server(first, ident0, "127.0.0.1:0")
        servers.append(server0)
        assert (first.server.link.give_up_after, first.server.link.link.timeout) == (240, 126)

        killed = threading.Event()

        def kill_and_restart() -> None:
            procs[0].send_signal(signal.SIGKILL)
            logs.append(procs[0].communicate()[1])
            killed.set()
            procs.append(_last(certs, port2, ck))

        killer = threading.Timer(0.03, kill_and_restart)

        stamps = []

        def on_step(step: int, loss: float) -> None:
            stamps.append(time.monotonic())
            if step == 2:
                killer.start()

        run = run_client(cfg, 0, f"127.0.0.1:{port0}", certs / "client-0", ck, on_step=on_step,
                         give_up_after=120)
        killer.join()
    finally:
        for s in servers:
            s.stop(grace=0).wait(10)
        for p in procs[len(logs):]:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                logs.append(p.communicate(timeout=60)[1])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[1])
    assert killed.is_set() and len(procs) == 2
    assert "restored from" in logs[1], logs[1][-2000:]
    assert middle.node.link.retries >= 1  # stage 1 noticed stage 2 go and come back
    assert first.server.link.retries == 0  # stage 0 waited on its call to stage 1 throughout
    assert max(b - a for a, b in zip(stamps, stamps[1:], strict=False)) > 3  # for longer than a flat deadline
    prepared = prepare(cfg, SplitSpec(0, 1))
    train(prepared.session)
    want = [row[0] for row in prepared.session.losses]
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(want), rtol=1e-5, atol=1e-6)
    for i, stage in enumerate(prepared.session.server.stages):
        _same(checkpoint.load(ck / f"stage-{i}.pt")["weights"], checkpoint.trainable_state({"trunk": stage.trunk}))
    assert checkpoint.load(ck / "stage-2.pt")["passes"] == STEPS
