"""Pipeline stages at scale, simulated on one machine: S = 1, 8, 16, 32 stage parties over one trunk.

    python -m suite.harness.pipeline_scale                    # tiny random-weight llama with 34 blocks
    python -m suite.harness.pipeline_scale --stages 1 8 16 32 --json out.json

One random-weight model with enough blocks for 32 one-block stages (the tiny llama family, 34 layers: head 1,
trunk 32, tail 1; SmolLM2's 30 layers leave 28 trunk blocks, too few for 32 stages) trains ``steps`` steps
with S stages, in one process, every message crossing the in-process transport as bytes. Per S, each as a
ratio to S = 1 measured in the same run:

* per-step wall time (median over the steps), clean;
* message bytes per step (every frame, client <-> server and stage <-> stage);
* audit overhead: the per-step time with ``transition_audit`` at ``rate`` on every stage over the clean time;
* detection latency: steps from the first tampered step to the first flag, for one stage (the middle one;
  the server at S = 1) that moves its weights and outputs on every step, audited at ``rate`` (mean over
  ``repeats`` seeds of the audit schedule).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.engine.training import train
from suite.experiment.cell import install_policy
from suite.experiment.config import parse_config
from suite.experiment.prepared import prepare
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import filter_observations, get_threat


def _cfg(stages: int, steps: int):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 16, "held_out": 4, "private": {"generator": "records", "size": 16, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 4, "stages": stages, "strategy": "batch_parallel"},
    })


def _run(base, stages: int, steps: int, audit: dict | None = None, tamper: bool = False, seed: int = 0) -> dict:
    import copy
    import dataclasses

    cfg = _cfg(stages, steps)
    spec = SplitSpec(1, 1)
    prepared = prepare(cfg, spec, loaded=dataclasses.replace(base, model=copy.deepcopy(base.model)),
                       keep_public=audit is not None)
    session = prepared.session
    defense = None
    if audit is not None:
        defense = make_defense("transition_audit", {**audit, "seed": 7919 + seed, "act": False})
        defense.install(session)
    if tamper:
        threat = get_threat("malicious_server" if stages == 1 else f"malicious_stage:{stages // 2}")
        attack = make_attack("tampering", threat, {"target": "both", "mode": "scaled_noise", "state": True,
                                                   "rate": 1.0, "scale": 0.1, "seed": seed})
        install_policy(session.server, threat, attack.server_policy(
            filter_observations(threat, spec=spec, tokenizer=base.tokenizer, max_length=cfg.data.max_length)))
    before = session.transport.bytes_sent
    logs = train(session)
    out = {"step_seconds": statistics.median(log.seconds for log in logs),
           "bytes_per_step": (session.transport.bytes_sent - before) / max(1, steps)}
    if defense is not None:
        flagged = sorted(defense.flagged_steps())
        out["first_flag"] = flagged[0] if flagged else None
    return out


def scale(stage_counts: Sequence[int], steps: int, rate: float, repeats: int, layers: int) -> list[dict]:
    base = tiny_model("llama", num_layers=layers)
    rows = []
    for s in stage_counts:
        clean = _run(base, s, steps)
        audited = _run(base, s, steps, audit={"rate": rate})
        latency = [_run(base, s, steps, audit={"rate": rate}, tamper=True, seed=seed)["first_flag"]
                   for seed in range(repeats)]
        caught = [x for x in latency if x is not None]
        rows.append({"stages": s, "step_seconds": clean["step_seconds"], "bytes_per_step": clean["bytes_per_step"],
                     "audited_step_seconds": audited["step_seconds"],
                     "audit_overhead": audited["step_seconds"] / clean["step_seconds"] - 1,
                     "detection_latency": statistics.mean(caught) if caught else None,
                     "caught_runs": f"{len(caught)}/{repeats}"})
        print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_seconds"] / ref["step_seconds"]
        r["bytes_ratio"] = r["bytes_per_step"] / ref["bytes_per_step"]
        r["overhead_ratio"] = (r["audit_overhead"] / ref["audit_overhead"]) if ref["audit_overhead"] > 0 else None
        r["latency_ratio"] = (r["detection_latency"] / ref["detection_latency"]
                              if r["detection_latency"] is not None and ref["detection_latency"] else None)
    return rows


def table(rows: Sequence[dict]) -> str:
    out = ["| S | step s (ratio) | bytes/step (ratio) | audit overhead (ratio) | detection latency, steps (ratio) |",
           "|---|---|---|---|---|"]

    def ratio(x):
        return "—" if x is None else f"{x:.2f}"

    for r in rows:
        lat = "—" if r["detection_latency"] is None else f"{r['detection_latency']:.1f}"
        out.append(f"| {r['stages']} | {r['step_seconds'] * 1000:.1f} ms ({r['time_ratio']:.2f}) | "
                   f"{r['bytes_per_step'] / 1024:.0f} KiB ({r['bytes_ratio']:.2f}) | "
                   f"{100 * r['audit_overhead']:+.0f} % ({ratio(r['overhead_ratio'])}) | "
                   f"{lat} [{r['caught_runs']}] ({ratio(r['latency_ratio'])}) |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rate", type=float, default=0.1, help="transition audit rate")
    p.add_argument("--repeats", type=int, default=5, help="audit schedules for the detection latency")
    p.add_argument("--layers", type=int, default=34)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.stages[0] != 1:
        p.error("--stages must start with 1: every ratio is to S = 1 in the same run")
    rows = scale(args.stages, args.steps, args.rate, args.repeats, args.layers)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
