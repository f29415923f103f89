"""Defenses and the integrity audit over gRPC + mutual TLS on loopback: each side installs its own part, the
two agree on them through the config hash, and a client can capture its traffic and attack it."""

import math
import struct
import time

import pytest
import torch

from suite.cli import _config_from_args, build_parser
from suite.engine.capture import MAGIC, CaptureError, read_capture
from suite.engine.protocol import ActivationMsg, decode
from suite.engine.split import SplitSpec, position_ids_for
from suite.errors import SplitleakError
from suite.experiment.prepared import prepare
from suite.net.certs import load_identity, make_certs
from suite.net.defended import choose_defense
from suite.net.link import LinkError, RemoteTransport
from suite.net.parties import build_service, run_client
from suite.net.server import start_server

ARGS = ["--model", "tiny-llama", "-k", "1", "-m", "1", "--clients", "1", "--batch-size", "2", "--max-length", "12",
        "--private-size", "12"]


def _cfg(*extra: str):
    return _config_from_args(build_parser().parse_args(["train", *ARGS, *extra]))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), clients=1)


class _Served:
    def __init__(self, certs, cfg, defense, **kw):
        self.service = build_service(cfg, defense=defense, **kw)
        self.server, port = start_server(self.service, load_identity(certs, "server"), "127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop(grace=0)


def _networked(certs, cfg, name="none", params=None, *, capture=None, server_params=None, policy=None):
    """A server in this process (gRPC threads) and client 0 against it; returns (run, client defense, service)."""
    server_defense = choose_defense(cfg, name, server_params if server_params is not None else params)
    defense = choose_defense(cfg, name, params)
    with _Served(certs, cfg, server_defense) as served:
        if policy is not None:
            served.service.server.policy = policy
        run = run_client(cfg, 0, served.address, certs, defense=defense, capture=capture, give_up_after=20)
    return run, defense, served.service


def _activations(path):
    cap = read_capture(path)
    return cap, [decode(f.data) for f in cap.frames if f.dst == "server" and isinstance(decode(f.data), ActivationMsg)]


def test_dp_gaussian_over_grpc_puts_its_noise_on_what_the_server_sees(certs, tmp_path):
    cfg = _cfg("--steps", "4")
    run, defense, service = _networked(certs, cfg, "dp_gaussian", {"sigma": 0.5, "clip": 1.0},
                                       capture=tmp_path / "dp.cap")
    assert len(run.losses) == 4 and all(math.isfinite(x) for x in run.losses)
    assert defense.report()["releases_per_record"] > 0 and defense.report()["noise_source"] == "os_random"
    # the server widened its magnitude bound for the noise the public parameters allow
    assert service.server.bounds.activation_norm >= 1.0 + 1.0 * (64 ** 0.5 + 10)
    cap, acts = _activations(tmp_path / "dp.cap")
    assert cap.header["defense"] == {"name": "dp_gaussian", "params": defense.public_params()}
    assert len(acts) == 4
    real = torch.cat([a.hidden[a.attention_mask.bool()] for a in acts])
    pad = torch.cat([a.hidden[~a.attention_mask.bool()] for a in acts])
    # clipped to norm 1 per sequence, then N(0, (sigma * 2C)^2 = 1) per coordinate: the noise dominates
    assert 0.9 < float(real.std()) < 1.1
    assert pad.numel() == 0 or float(pad.abs().max()) == 0.0  # padding leaves as exact zeros


def test_dp_sgd_over_grpc_clips_and_noises_the_servers_adapters_and_the_clients_head_and_tail(certs):
    """Red team: `serve --defense dp_sgd` trained the server's adapters with plain AdamW, and the client's
    install raised AttributeError. Now each side installs its DP-SGD, from its own objects."""
    from opacus.optimizers import DPOptimizer

    cfg = _cfg("--steps", "2")
    clip, seen = 1e-3, []

    def record(opt):  # Opacus' step hook: after clipping, noise and averaging, before AdamW steps
        summed = torch.cat([p.summed_grad.reshape(-1) for p in opt.params])
        noisy = torch.cat([p.grad.reshape(-1) for p in opt.params]) * opt.expected_batch_size
        raw = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in opt.grad_samples], 1).norm(dim=1)
        seen.append((float(summed.norm()), opt.expected_batch_size, float(raw.max()), float((noisy - summed).norm())))

    params = {"sigma": 1.0, "clip": clip, "target": "both"}
    with _Served(certs, cfg, choose_defense(cfg, "dp_sgd", params)) as served:
        optimizers = [o for o in served.service.server.optimizers.values() if o is not None]
        assert optimizers and all(isinstance(o, DPOptimizer) for o in optimizers)
        for o in optimizers:
            o.attach_step_hook(record)
        defense = choose_defense(cfg, "dp_sgd", params)
        run = run_client(cfg, 0, served.address, certs, defense=defense, give_up_after=20)
    assert len(run.losses) == 2 and all(math.isfinite(x) for x in run.losses)
    assert served.service.completed == {0: 2} and len(seen) == 2
    for summed, rows, raw, noise in seen:
        assert rows == 2 and raw > clip  # the batch's rows; each example's gradient needed clipping
        assert summed <= rows * clip * 1.0001  # the clipped sum: at most clip per example
        assert noise > 0  # and noise on it
    assert isinstance(defense._client.optimizer, DPOptimizer) and defense._client.optimizer_steps == 2
    assert math.isfinite(run.defense_report["epsilon"]) and run.defense_report["steps"] == 2


def test_dxp_over_grpc_perturbs_what_leaves_the_head(certs, tmp_path):
    cfg = _cfg("--steps", "2")
    head = prepare(cfg, SplitSpec(1, 1)).session.clients[0].head  # the head as step 0 sends through it

    def first_sent(name, params, path):
        run, _, service = _networked(certs, cfg, name, params, capture=path)
        assert all(math.isfinite(x) for x in run.losses)
        cap, acts = _activations(path)
        ids, mask = cap.truth[(0, 0)]
        with torch.no_grad():
            clean = head(ids, mask, position_ids_for(mask))
        return acts[0].hidden, clean, mask.bool(), service.server.bounds.activation_norm

    sent, clean, real, plain_bound = first_sent("none", {}, tmp_path / "none.cap")
    assert torch.allclose(sent, clean, atol=1e-5)  # control: without a defense the server sees the head output
    sent, clean, real, bound = first_sent("dxp", {"eta": 10.0}, tmp_path / "dxp.cap")
    assert float((sent - clean)[real].norm(dim=-1).mean()) > 0.1 * float(clean[real].norm(dim=-1).mean())
    assert bound == pytest.approx(plain_bound + (64 + 12 * 8) / 10.0)  # the server allows for the noise


def test_the_audit_over_grpc_catches_a_tampering_server_and_passes_an_honest_one(certs):
    from attacks.tampering import TamperingConfig, TamperPolicy

    cfg = _cfg("--steps", "6")
    params = {"audit_rate": 1.0, "spot_tokens": 2}
    run, audit, service = _networked(certs, cfg, "integrity_audit", params)
    assert audit.flags == [] and service.reveals >= 6 and audit.reveals >= 6
    assert isinstance(audit._reveal.__self__, RemoteTransport)  # reveals cross the link, never a local object
    assert service.server.commit_state
    policy = TamperPolicy(TamperingConfig(mode="random", target="both", rate=0.5, scale=0.1, seed=3))
    run, audit, _ = _networked(certs, cfg, "integrity_audit", params, policy=policy)
    tampered = {step for step, _ in policy.tampered}  # a step flagged at its hidden states skips the gradient checks
    assert tampered and tampered <= {step for step, _ in audit.flagged_steps()}
    assert len(run.losses) == 6  # a flagged step is rejected; training goes on


def test_the_audit_flags_a_server_that_does_not_commit(certs):
    cfg = _cfg("--steps", "2")
    # a server started without the audit cannot pass the hash; one that agreed but commits nothing is caught on
    # every step, even by a client that spot-checks nothing and never audits (red team 24.2)
    defense = choose_defense(cfg, "integrity_audit", {"audit_rate": 0.0, "spot_tokens": 0})
    with _Served(certs, cfg, defense) as served:
        served.service.server.commit_state = False
        run_client(cfg, 0, served.address, certs, defense=defense, give_up_after=20)
    assert {f["step"] for f in defense.flags} == {0, 1}


def test_client_and_server_with_different_defenses_are_refused_in_one_line(certs):
    cfg = _cfg("--steps", "1")
    server = choose_defense(cfg, "dp_gaussian", {"sigma": 0.5})
    for name, params in (("none", {}), ("dp_gaussian", {"sigma": 0.6}), ("dxp", {})):
        with _Served(certs, cfg, server) as served:
            start = time.monotonic()
            with pytest.raises(LinkError, match="different defenses") as err:
                run_client(cfg, 0, served.address, certs, defense=choose_defense(cfg, name, params))
        assert "\n" not in str(err.value) and "sigma=0.5" in str(err.value) and not err.value.transient
        assert time.monotonic() - start < 30  # at once, not after the retry budget


def test_networked_defense_refusals_are_one_line(monkeypatch):
    from suite.net.defended import describe
    from suite.net.parties import config_hash

    cfg = _cfg("--steps", "1")
    one, other = choose_defense(cfg, "dp_gaussian", {"sigma": 1}), choose_defense(cfg, "dp_gaussian", {"sigma": 1.0})
    assert describe(one) == describe(other) and config_hash(cfg, one) == config_hash(cfg, other)
    assert config_hash(cfg, choose_defense(cfg, "dp_gaussian", {"sigma": 1.5})) != config_hash(cfg, one)
    assert config_hash(cfg, choose_defense(cfg, "none")) == config_hash(cfg)  # old hashes (checkpoints) hold
    with pytest.raises(SplitleakError, match="seed fixes its noise"):
        choose_defense(cfg, "dp_gaussian", {"seed": 1})
    with pytest.raises(SplitleakError, match="has no parameter"):
        choose_defense(cfg, "dp_gaussian", {"sgima": 1})
    dp = type(choose_defense(cfg, "dp_gaussian"))
    monkeypatch.setattr(dp, "network_refusal", "it needs X")
    with pytest.raises(SplitleakError, match="cannot run in serve/client: it needs X"):
        choose_defense(cfg, "dp_gaussian")


@pytest.mark.parametrize("name,one,other", [
    ("dp_gaussian", {"freeze": 0}, {"freeze": False}),
    ("dp_gaussian", {"hide_lengths": 1, "direction": "both"}, {"hide_lengths": "true", "direction": "both"}),
    ("dp_gaussian", {"grad_clip": 1.0}, {}),  # None means clip: the same setting
    ("integrity_audit", {"spot_tokens": 2.0}, {"spot_tokens": 2}),
])
def test_one_setting_spelled_two_ways_has_one_hash(name, one, other):
    """Red team 24.7: honest sides that spell a parameter differently are not refused at Hello."""
    from suite.net.defended import describe
    from suite.net.parties import config_hash

    cfg = _cfg("--steps", "1")
    a, b = choose_defense(cfg, name, one), choose_defense(cfg, name, other)
    assert describe(a) == describe(b) and config_hash(cfg, a) == config_hash(cfg, b)


@pytest.mark.parametrize("name,params,match", [
    ("dp_gaussian", {"freeze": "no"}, "freeze is true or false"),
    ("dp_gaussian", {"freeze": 2}, "freeze is true or false"),
    ("dxp", {"eta": math.inf}, "eta must be a finite number"),  # inf: no noise at all under a DxP label
    ("dxp", {"eta": math.nan}, "eta must be a finite number"),
    ("integrity_audit", {"rtol": math.inf}, "rtol must be a finite number"),
    ("integrity_audit", {"rtol": math.nan}, "rtol must be a finite number"),
    ("integrity_audit", {"z_threshold": math.nan}, "z_threshold must be a finite number"),
    ("integrity_audit", {"min_cosine": math.nan}, "min_cosine must be a finite number"),
    ("integrity_audit", {"spot_tokens": 2.5}, "spot_tokens must be a whole number"),
    ("integrity_audit", {"audit_rate": "high"}, "audit_rate must be a number"),
])
def test_out_of_range_defense_parameters_are_one_line(name, params, match):
    """Red team 24.6: a parameter that would switch the mechanism off (or crash it later) is refused."""
    cfg = _cfg("--steps", "1")
    with pytest.raises(SplitleakError, match=match) as err:
        choose_defense(cfg, name, params)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,params", [("none", {}), ("dp_gaussian", {"sigma": 0.02, "clip": 1.0})])
def test_a_networked_capture_attacked_matches_the_in_process_cell(certs, tmp_path, name, params):
    from suite.experiment.capture_attack import attack_capture
    from suite.experiment.cell import run_cell
    from suite.scoring.intervals import summarize

    cfg = _cfg("--steps", "6")  # 6 steps x 2 rows: the client's 12 records once each, as the in-process capture
    _networked(certs, cfg, name, params, capture=tmp_path / "run.cap")
    remote = attack_capture(cfg, tmp_path / "run.cap", "curious_server", "nearest_embedding")
    local = run_cell(cfg, SplitSpec(1, 1), "curious_server", "nearest_embedding", defense_name=name,
                     defense_params=params)
    assert remote.batches == 6 and len(remote.references) == 12
    assert sorted(remote.references) == sorted(local.references)  # the same records
    iv, mine = remote.intervals, summarize([local.scores])
    if name == "none":  # no randomness: the same model and records give the same accuracy
        assert iv["token_accuracy_lo"] <= local.metrics.token_accuracy <= iv["token_accuracy_hi"]
    else:  # fresh noise on each side: the two 95 % intervals overlap, away from the trivial 0 and 1
        assert iv["token_accuracy_lo"] <= mine["token_accuracy_hi"] and mine["token_accuracy_lo"] <= iv["token_accuracy_hi"]
        assert 0.2 < remote.metrics.token_accuracy < 0.97 and 0.2 < local.metrics.token_accuracy < 0.97


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_crafted_capture_file_is_a_one_line_error(tmp_path):
    cfg = _cfg("--steps", "1")
    header = b'{"format": "splitleak-capture", "version": 1, "head_blocks": 1, "tail_blocks": 1, "max_length": 12}'
    good = MAGIC + struct.pack(">I", len(header)) + header
    cases = {
        "not a splitleak capture": b"hello",
        "header length": MAGIC + struct.pack(">I", 1 << 30),
        "not JSON": MAGIC + struct.pack(">I", 3) + b"{{{",
        "truncated record": good + b"F\x00\x00",
        "claims 4096 bytes": good + b"F" + struct.pack(">I", 4096) + b"xx",
        "unknown record tag": good + b"Z" + struct.pack(">I", 0),
        "endpoint": good + b"F" + struct.pack(">I", 8) + b"\x03abc\x03def",
        "between the server and a client": good + b"F" + struct.pack(">I", 14) + b"\x06server\x06server",
        "not a safetensors": good + b"T" + struct.pack(">I", 4) + b"\xff\xff\xff\xff",
    }
    for i, (why, data) in enumerate(cases.items()):
        with pytest.raises(CaptureError, match=why):
            read_capture(_write(tmp_path / f"c{i}", data))
    from suite.experiment.capture_attack import attack_capture

    body = b"\x08client/0\x06server" + b"SPLK\x00\x01\x00\x00"
    junk = good + b"F" + struct.pack(">I", len(body)) + body
    with pytest.raises(CaptureError, match="capture frame 0"):
        attack_capture(cfg, _write(tmp_path / "junk", junk), "curious_server", "nearest_embedding")
    with pytest.raises(CaptureError, match="no activation"):
        attack_capture(cfg, _write(tmp_path / "empty", good), "curious_server", "nearest_embedding")
    with pytest.raises(SplitleakError, match="colluding client's weights"):
        attack_capture(cfg, _write(tmp_path / "e2", good), "colluding_client", "nearest_embedding")
    deep = header.replace(b'"head_blocks": 1', b'"head_blocks": 999')
    with pytest.raises(CaptureError, match="leaves no server block"):
        attack_capture(cfg, _write(tmp_path / "e3", MAGIC + struct.pack(">I", len(deep)) + deep), "curious_server",
                       "nearest_embedding")
    odd = header.replace(b'"version": 1, ', b'"version": 1, "defense": {"name": "dp_gaussian", "params": {"x": 1}}, ')
    with pytest.raises(SplitleakError, match="has no parameter"):
        attack_capture(cfg, _write(tmp_path / "e4", MAGIC + struct.pack(">I", len(odd)) + odd), "curious_server",
                       "nearest_embedding")


def _capture(header: dict, *records: bytes) -> bytes:
    import json

    raw = json.dumps({"format": "splitleak-capture", "version": 1, "head_blocks": 1, "tail_blocks": 1,
                      "max_length": 12, "model": "tiny-llama", **header}).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + b"".join(records)


def _record(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack(">I", len(body)) + body


def _activation_frame(rows=2, length=12) -> bytes:
    from suite.engine.protocol import encode

    mask = torch.ones(rows, length, dtype=torch.long)
    msg = ActivationMsg(0, 0, "to_server", torch.randn(rows, length, 64), attention_mask=mask,
                        position_ids=position_ids_for(mask))
    return _record(b"F", b"\x08client/0\x06server" + encode(msg))


def test_a_crafted_capture_header_or_truth_is_one_line_before_any_work(tmp_path):
    """Red team 24.3 / 24.4: a header max_length the frames do not have (attacks pad shadow text to it: a huge
    one exhausted memory) and a truth record with no real position (a traceback in scoring) are refused."""
    from safetensors.torch import save as st_save

    from suite.experiment.capture_attack import attack_capture

    cfg = _cfg("--steps", "1")
    with pytest.raises(CaptureError, match="max_length 100000 exceeds"):
        read_capture(_write(tmp_path / "huge", _capture({"max_length": 100000}, _activation_frame(1, 4))))
    with pytest.raises(CaptureError, match="max_length 60 differs from its frames' length 4"):
        attack_capture(cfg, _write(tmp_path / "big", _capture({"max_length": 60}, _activation_frame(1, 4))),
                       "curious_server", "nearest_embedding")
    zero = st_save({"input_ids": torch.ones(2, 12, dtype=torch.long),
                    "attention_mask": torch.zeros(2, 12, dtype=torch.long)}, metadata={"client_id": "0", "step": "0"})
    with pytest.raises(CaptureError, match="marks no real position"):
        read_capture(_write(tmp_path / "zero", _capture({}, _activation_frame(), _record(b"T", zero))))


def test_a_large_file_that_is_no_capture_is_refused_without_reading_it(tmp_path):
    """Red team 24.5: the magic bytes are checked before the rest of the file is read."""
    import tracemalloc

    path = tmp_path / "sparse"
    with path.open("wb") as fh:
        fh.truncate(256 << 20)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(CaptureError, match="not a splitleak capture"):
            read_capture(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_a_mutated_real_capture_never_crashes_the_reader(certs, tmp_path):
    import random

    from suite.experiment.capture_attack import server_view

    cfg = _cfg("--steps", "1")
    _networked(certs, cfg, capture=tmp_path / "run.cap")
    data = (tmp_path / "run.cap").read_bytes()
    rng = random.Random(0)
    for _ in range(200):
        bad = bytearray(data)
        for _k in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[: rng.randrange(len(bad))]
        try:
            cap = read_capture(_write(tmp_path / "m", bytes(bad)))
            server_view(cap.frames, 64, cap.header["max_length"])
        except CaptureError as err:
            assert "\n" not in str(err)


def test_a_per_client_reveal_holds_only_the_asking_clients_adapters():
    from suite.engine.commitment import decode_reveal
    from suite.engine.training import train
    from suite.interfaces.defense import make_defense

    cfg = _cfg("--steps", "3", "--strategy", "per_client", "--clients", "2")
    prepared = prepare(cfg, SplitSpec(1, 1))
    audit = make_defense("integrity_audit", {"audit_rate": 1.0})
    audit.install(prepared.session)
    train(prepared.session)
    assert audit.flags == [] and audit.reveals >= 6  # honest per_client training passes the audit
    for client in (0, 1):
        state, adapter = decode_reveal(prepared.session.server.reveal(client, 2))
        other = f".client{1 - client}."
        assert adapter == f"client{client}" and state and not any(other in name for name in state)


def test_the_command_line_runs_a_defense_across_processes_and_attacks_the_capture(certs, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "suite.cli"]
    dp = ["--defense", "dp_gaussian", "--defense-param", "sigma=0.5"]
    server = subprocess.Popen([*run, "serve", *ARGS, "--steps", "2", *dp, "--certs", str(certs), "--listen",
                               f"127.0.0.1:{port}", "--capture", str(tmp_path / "server.cap")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        client = [*run, "client", *ARGS, "--steps", "2", "--certs", str(certs), "--server", f"127.0.0.1:{port}",
                  "--id", "0", "--give-up-after", "60"]
        plain = subprocess.run(client, capture_output=True, text=True, env=env, timeout=240)
        assert plain.returncode == 2, plain.stderr[-2000:]
        lines = [ln for ln in plain.stderr.splitlines() if "splitleak: error:" in ln]
        assert len(lines) == 1, plain.stderr[-2000:]
        line = lines[0]
        assert "different defenses" in line and "--defense" in line
        ok = subprocess.run([*client, *dp, "--capture", str(tmp_path / "client.cap")], capture_output=True,
                            text=True, env=env, timeout=240)
        assert ok.returncode == 0, ok.stderr[-2000:]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=120)  # generous: CI machines may be loaded
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert len([f for f in read_capture(tmp_path / "server.cap").frames if f.src == "client/0"]) == 4
    attacked = subprocess.run([*run, "attack", *ARGS, "--threat", "curious_server", "--attack", "nearest_embedding",
                               "--capture", str(tmp_path / "client.cap")], capture_output=True, text=True, env=env,
                              timeout=240)
    assert attacked.returncode == 0, attacked.stderr[-2000:]
    assert "2 batches" in attacked.stdout and "token acc" in attacked.stdout


@pytest.mark.parametrize("name,params", [("dp_laplace", {"sigma": 0.5}), ("nopeek", {}), ("mid", {}),
                                         ("bottleneck", {"rank": 4, "sim_steps": 1}), ("santext", {}),
                                         ("fsha_detector", {}), ("encryption", {"mode": "rsa"}),
                                         ("dp_gaussian", {"direction": "both", "hide_lengths": True})])
def test_every_matrix_defense_runs_across_processes(certs, name, params, tmp_path):
    cfg = _cfg("--steps", "2")
    run, defense, service = _networked(certs, cfg, name, params, capture=tmp_path / "c.cap")
    assert len(run.losses) == 2 and all(math.isfinite(x) for x in run.losses), (name, run.losses)
    assert service.completed == {0: 2}
    if name == "encryption":
        assert service.end.keys.mode == "rsa"
    if params.get("hide_lengths"):  # no mask crossed: the server saw every position as real
        assert all(a.attention_mask is None for a in _activations(tmp_path / "c.cap")[1])
        from suite.experiment.capture_attack import attack_capture

        # and an eavesdropper on that plaintext still inverts it (not "nothing to invert")
        wire = attack_capture(cfg, tmp_path / "c.cap", "eavesdropper", "wire_inversion")
        assert wire.reconstruction.extra["parsed_activations"] == 2 and wire.metrics is not None


def test_a_reveal_lost_before_the_server_read_it_renews_the_channel(certs):
    import grpc

    cfg = _cfg("--steps", "3")
    defense = choose_defense(cfg, "integrity_audit", {"audit_rate": 1.0})
    service = build_service(cfg, defense=choose_defense(cfg, "integrity_audit", {"audit_rate": 1.0}))
    honest, lost = service.reveal, []

    def flaky(request, context):  # the first reveal never reaches the service: the channel's counters part
        if not lost:
            lost.append(1)
            context.abort(grpc.StatusCode.UNAVAILABLE, "lost on the way")
        return honest(request, context)

    service.reveal = flaky
    server, port = start_server(service, load_identity(certs, "server"), "127.0.0.1:0")
    try:
        run = run_client(cfg, 0, f"127.0.0.1:{port}", certs, defense=defense, give_up_after=30)
    finally:
        server.stop(grace=0)
    assert len(run.losses) == 3 and run.reconnects == 1  # renewed, the step retried, training went on
    assert [f["step"] for f in defense.flags] == [0]  # the step whose state could not be revealed was flagged
