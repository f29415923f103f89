"""Costs of leaving one process, measured side by side in one run (see `splitleak bench`).

* gRPC + mTLS over loopback vs in-process: one client's split step (two round trips) against a
  `splitleak serve` process on 127.0.0.1, interleaved with the same step through the in-process byte
  transport with the same AES-GCM channel, same model, batch and adapters. Medians are compared.
* Ray task overhead per cell: a small matrix on the tiny test model, run by the local runner and then as
  Ray tasks on a local cluster; (Ray time - local time) / cells, with the cluster's start-up reported apart.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from suite.engine.transport import InProcessTransport
from suite.errors import SplitleakError
from suite.experiment.config import parse_config
from suite.interfaces.defense import make_defense


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpc_step_times(model: str, batch_size: int, max_length: int, reps: int, head_blocks: int,
                    tail_blocks: int, defense: str = "none", defense_params: dict | None = None) -> dict:
    """Median step times side by side; under ``defense`` (``splitleak serve/client --defense``) both sides
    run it: in process installed on the session, over gRPC each side its own part."""
    from suite.engine.split import SplitSpec
    from suite.engine.step import training_step
    from suite.experiment.prepared import prepare
    from suite.harness.synthetic import random_batch
    from suite.interfaces.defense import RemoteServer
    from suite.net.certs import load_identity, make_certs
    from suite.net.defended import choose_defense, describe
    from suite.net.link import Link, RemoteTransport
    from suite.net.parties import config_hash

    cfg = parse_config({"model": {"name": model}, "data": {"max_length": max_length},
                        "training": {"clients": 1, "batch_size": batch_size, "head_blocks": head_blocks,
                                     "tail_blocks": tail_blocks, "steps": reps + 2}})
    spec = SplitSpec(head_blocks, tail_blocks)
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp) / "certs", clients=1)
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "suite.cli", "serve", "--model", model, "-k", str(head_blocks), "-m",
             str(tail_blocks), "--clients", "1", "--batch-size", str(batch_size), "--max-length", str(max_length),
             "--steps", str(reps + 2), "--certs", str(certs), "--listen", f"127.0.0.1:{port}", "--defense", defense,
             *(f"--defense-param={k}={v}" for k, v in (defense_params or {}).items())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            local = prepare(cfg, spec, transport=make_defense("encryption").wrap_transport(InProcessTransport()))
            choose_defense(cfg, defense, defense_params).install(local.session)
            remote = prepare(cfg, spec)
            client = remote.session.clients[0]
            link = Link(f"127.0.0.1:{port}", load_identity(certs, "client-0"))
            theirs = choose_defense(cfg, defense, defense_params)
            client.transport = RemoteTransport(link, 0, config_hash(cfg, theirs), describe(theirs))
            theirs.install_client(client, RemoteServer(remote.session.server.trunk, client.transport.reveal,
                                                        dict(remote.session.server.adapters)))
            client.transport.connect(hello_timeout=180)
            batch = random_batch(remote.loaded.model.config.vocab_size, batch_size, max_length)
            lc, ls = local.session.clients[0], local.session.server
            times: dict[str, list[float]] = {"in_process": [], "grpc": []}
            for i in range(reps + 2):
                t = time.perf_counter()
                training_step([lc], ls, i, [batch])
                dt_local = time.perf_counter() - t
                t = time.perf_counter()
                training_step([client], None, i, [batch])  # the server's half runs in `splitleak serve`
                dt_remote = time.perf_counter() - t
                if i >= 2:
                    times["in_process"].append(dt_local)
                    times["grpc"].append(dt_remote)
            link.close()
        finally:
            server.terminate()
            _, err = server.communicate(timeout=30)
        if not times["grpc"]:
            raise SplitleakError(f"the gRPC benchmark server failed: {err.strip().splitlines()[-1:]}")
    a, b = statistics.median(times["in_process"]), statistics.median(times["grpc"])
    return {"grpc_model": model, "grpc_defense": defense, "in_process_encrypted_s_per_step": a,
            "grpc_mtls_s_per_step": b, "grpc_over_in_process": b / a}


RAY_MATRIX = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 2},
    "matrix": {"splits": [0, 1, 2], "threats": ["curious_server", "eavesdropper"],
               "attacks": ["nearest_embedding", "wire_inversion"], "defenses": ["none", "encryption"]},
}


def ray_overhead() -> dict:
    try:
        import ray
    except ImportError:
        return {"ray": "not installed (pip install 'splitleak[ray]')"}
    from suite.experiment.schedule import run_matrix

    cfg = parse_config(RAY_MATRIX)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        local = run_matrix(cfg, Path(tmp) / "local")
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start_s = time.perf_counter() - t
        try:
            t = time.perf_counter()
            run_matrix(cfg, Path(tmp) / "ray", executor="ray")
            ray_s = time.perf_counter() - t
        finally:
            ray.shutdown()
    cells = local["cells"]
    return {"ray_cells": cells, "ray_groups": local["groups"], "local_matrix_s": local_s, "ray_matrix_s": ray_s,
            "ray_cluster_start_s": start_s, "ray_overhead_s_per_cell": (ray_s - local_s) / cells,
            "ray_overhead_s_per_task": (ray_s - local_s) / local["groups"]}


def capture_parity(model: str, attack: str, defense: str, params: dict, steps: int = 6, batch_size: int = 2,
                   max_length: int = 12) -> dict:
    """Token accuracy of ``attack`` (curious server) on a networked run's capture (one client against a server
    in this process, gRPC + mTLS on loopback) next to the in-process cell of the same config and seed, each
    with its 95 % bootstrap interval. The client's shard is ``steps x batch_size`` records, so the training
    traffic covers each once, as the in-process capture pass does."""
    from suite.engine.split import SplitSpec
    from suite.experiment.capture_attack import attack_capture
    from suite.experiment.cell import run_cell
    from suite.net.certs import load_identity, make_certs
    from suite.net.defended import choose_defense
    from suite.net.parties import build_service, run_client
    from suite.net.server import start_server
    from suite.scoring.intervals import summarize

    cfg = parse_config({"model": {"name": model}, "data": {"max_length": max_length, "private": {
        "generator": "records", "size": steps * batch_size, "seed": 1}},
        "training": {"clients": 1, "batch_size": batch_size, "head_blocks": 1, "tail_blocks": 1, "steps": steps}})
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp) / "certs", clients=1)
        service = build_service(cfg, defense=choose_defense(cfg, defense, params))
        server, port = start_server(service, load_identity(certs, "server"), "127.0.0.1:0")
        try:
            run_client(cfg, 0, f"127.0.0.1:{port}", certs, defense=choose_defense(cfg, defense, params),
                       capture=Path(tmp) / "run.cap")
        finally:
            server.stop(grace=0)
        remote = attack_capture(cfg, Path(tmp) / "run.cap", "curious_server", attack)
    local = run_cell(cfg, SplitSpec(1, 1), "curious_server", attack, defense_name=defense, defense_params=params)
    mine = summarize([local.scores])
    return {"parity_attack": attack, "defense": defense, "params": params,
            "networked_token_accuracy": [remote.metrics.token_accuracy, remote.intervals["token_accuracy_lo"],
                                         remote.intervals["token_accuracy_hi"]],
            "in_process_token_accuracy": [local.metrics.token_accuracy, mine["token_accuracy_lo"],
                                          mine["token_accuracy_hi"]]}


def main(argv: list[str] | None = None) -> None:
    """``python -m suite.harness.net_bench --defense dp_gaussian --defense-param sigma=0.5``: one line of JSON."""
    import argparse
    import json
    import tomllib

    p = argparse.ArgumentParser(description=grpc_step_times.__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("-k", "--head-blocks", type=int, default=1)
    p.add_argument("-m", "--tail-blocks", type=int, default=1)
    p.add_argument("--defense", default="none")
    p.add_argument("--defense-param", action="append", default=[])
    p.add_argument("--parity", metavar="ATTACK", help="instead: capture_parity of this attack (tiny models)")
    a = p.parse_args(argv)
    params = {k: tomllib.loads(f"v = {v}")["v"] for k, _, v in (x.partition("=") for x in a.defense_param)}
    if a.parity:
        print(json.dumps(capture_parity(a.model, a.parity, a.defense, params)))
        return
    print(json.dumps(grpc_step_times(a.model, a.batch_size, a.max_length, a.reps, a.head_blocks, a.tail_blocks,
                                     a.defense, params)))


if __name__ == "__main__":
    main()
