"""The transition audit against a tampering server or stage: detection curve, false positives, cost, resume.

    python -m suite.harness.transition_bench                       # tiny llama, minutes on 2 cores
    python -m suite.harness.transition_bench --json out.json --rates 0.02 0.05 0.1 0.25 1.0

For S = 1 (``malicious_server``) and S = 4 (``malicious_stage:2``), two adversaries on the ``tampering``
policy, both tampering with probability ``tamper_rate`` per step:

* ``outputs``: noise on what it sends forward and backward (``scaled_noise``, ``scale``);
* ``adaptive``: it knows the audit and its rate, and moves its *weights* toward its own goal on a tampered
  step as well as its outputs (``state = true``); at S = 1 this is the outside read's server when ``target
  = none`` (state only, honest outputs), run as ``state_only``.

Against each, the ``transition_audit`` at every rate (every server-side party audited, ``act = false`` for the
curve): per-step recall (flagged tampered transitions / tampered transitions), the false-positive rate
(flagged untampered transitions / untampered transitions), the per-run recall (runs with a flag / runs)
beside 1 - (1 - rate)^T for the T tampered steps, the detection latency (steps from the first tampered step to
the first flag) and the extra compute (re-executed trunk passes over the audited parties' passes, and
measured seconds over the training's). Then one run with ``act = true`` beside the clean run: the steps
lost and whether the held-out loss rejoins the clean curve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat

ADVERSARIES = {
    "outputs": {"target": "both", "mode": "scaled_noise"},
    "adaptive": {"target": "both", "mode": "scaled_noise", "state": True},
    "state_only": {"target": "none", "state": True},
}


def _cfg(stages: int, steps: int):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "held_out": 8, "private": {"generator": "records", "size": 16, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 2, "stages": stages, "strategy": "batch_parallel"},
    })


def one_run(base, stages: int, steps: int, adversary: str | None, tamper_rate: float, scale: float,
            audit: dict | None, seed: int) -> dict:
    """One training run; ``adversary`` None is the clean run."""
    cfg = _cfg(stages, steps)
    threat = attack = None
    if adversary is not None:
        threat = get_threat("malicious_server" if stages == 1 else f"malicious_stage:{stages // 2}")
        attack = make_attack("tampering", threat, {**ADVERSARIES[adversary], "rate": tamper_rate, "scale": scale,
                                                   "seed": seed})
    # the audit draws its schedule from its own seed, unrelated to the tampering policy's
    defense = make_defense("transition_audit", {**audit, "seed": 7919 + seed}) if audit is not None else None
    start = time.perf_counter()
    trained = train_split(cfg, SplitSpec(1, 1), base, threat, attack, defense, reference=False)
    seconds = time.perf_counter() - start
    # training steps only: the policy keeps deviating while the traffic is captured, when nothing trains
    tampered = sorted({s for s, _ in attack.policy.tampered if s < steps}) if attack is not None else []
    out = {"stages": stages, "steps": steps, "adversary": adversary or "clean", "tamper_rate": tamper_rate,
           "scale": scale,
           "seed": seed, "tampered_steps": tampered, "final_loss": trained.utility, "seconds": seconds}
    if defense is not None:
        r = defense.report()
        # training steps only, like ``tampered``: the capture's update-free passes are audited too, and their
        # flags (the policy deviating while traffic is captured) are not part of the training curve
        flagged = sorted({f["step"] for f in defense.flags if f["training"]})
        out.update(audit_rate=audit["rate"], act=audit.get("act", True), flagged_steps=flagged,
                   audited=r["audited"], transitions=r["transitions"], extra_compute=r["extra_compute"],
                   extra_compute_trunk=r["extra_compute_trunk"], seconds_recomputing=r["seconds_recomputing"],
                   replacements=r["replacements"])
    return out


def curve(stages_list: Sequence[int], rates: Sequence[float], adversaries: Sequence[str], repeats: int, steps: int,
          tamper_rate: float, scale: float) -> list[dict]:
    base = tiny_model("llama", num_layers=6)
    rows = []
    for stages in stages_list:
        for adversary in adversaries:
            if adversary == "state_only" and stages != 1:
                continue
            for rate in rates:
                runs = [one_run(base, stages, steps, adversary, tamper_rate, scale, {"rate": rate, "act": False},
                                seed) for seed in range(repeats)]
                rows.append(summarise(runs, stages, adversary, rate))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), flush=True)
    return rows


def summarise(runs: list[dict], stages: int, adversary: str, rate: float) -> dict:
    bad = sum(len(r["tampered_steps"]) for r in runs)
    caught = sum(len(set(r["flagged_steps"]) & set(r["tampered_steps"])) for r in runs)
    # per training step (a step holds one transition per stage): a step is clean when the party did not tamper
    clean_steps = sum(r["steps"] - len(r["tampered_steps"]) for r in runs)
    false = sum(len(set(r["flagged_steps"]) - set(r["tampered_steps"])) for r in runs)
    latency = [min(r["flagged_steps"]) - min(r["tampered_steps"]) for r in runs
               if r["flagged_steps"] and r["tampered_steps"]]
    expected = statistics.mean(1 - (1 - rate) ** len(r["tampered_steps"]) for r in runs)
    return {"stages": stages, "adversary": adversary, "audit_rate": rate, "runs": len(runs),
            "tampered_steps": bad, "per_step_recall": caught / bad if bad else None,
            "false_positive_rate": false / clean_steps if clean_steps else 0.0,
            "run_recall": sum(bool(r["flagged_steps"]) for r in runs) / len(runs),
            "run_recall_expected": expected,
            "latency_steps": statistics.mean(latency) if latency else None,
            "extra_compute": statistics.mean(r["extra_compute"] for r in runs),
            "extra_seconds": statistics.mean(r["seconds_recomputing"] / r["seconds"] for r in runs)}


def resume(stages: int, steps: int, rate: float, tamper_rate: float, scale: float, seed: int = 0) -> dict:
    """The clean run, the tampered run without audit, and with the audit acting (exclusion + standby)."""
    base = tiny_model("llama", num_layers=6)
    clean = one_run(base, stages, steps, None, 0.0, scale, None, seed)
    hurt = one_run(base, stages, steps, "adaptive", tamper_rate, scale, None, seed)
    acted = one_run(base, stages, steps, "adaptive", tamper_rate, scale, {"rate": rate, "act": True}, seed)
    return {"stages": stages, "audit_rate": rate, "tamper_rate": tamper_rate, "scale": scale,
            "clean_loss": clean["final_loss"], "tampered_loss": hurt["final_loss"], "audited_loss": acted["final_loss"],
            "replacements": acted["replacements"], "tampered_steps_after_audit": acted["tampered_steps"]}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rates", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.25, 1.0])
    p.add_argument("--adversaries", nargs="+", default=list(ADVERSARIES))
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tamper-rate", type=float, default=0.2)
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = curve(args.stages, args.rates, args.adversaries, args.repeats, args.steps, args.tamper_rate, args.scale)
    resumed = [resume(s, args.steps, 0.1, args.tamper_rate, args.scale) for s in args.stages]
    for r in resumed:
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"curve": rows, "resume": resumed}, f, indent=1)


if __name__ == "__main__":
    main()
