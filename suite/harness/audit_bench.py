"""Integrity defenses against servers that adapt to them: curves of attack strength vs detection.

    python -m suite.harness.audit_bench                  # tiny-llama, a few minutes on 2 CPU cores
    python -m suite.harness.audit_bench --json out.json

1. ``integrity_audit`` (replica + commitments, no access to the live trunk) against the ``tampering`` server,
   plain and ``adaptive`` (it read the audit's public parameters and tampers only past the spot-checked
   prefix / where the gradient invariant holds). Strength: tamper probability per step (``rate``) and
   magnitude (``scale``, noise std relative to the tensor's std). Per run: recall (tampered replies that were
   flagged) and false-positive rate (untampered replies that were flagged).
2. ``fsha_detector`` against FSHA that mixes in the honest gradient (``honest_mix`` w: it sends
   w * honest + (1 - w) * hijack). Per w: whether and when the detector alarmed, and the attack's token
   accuracy on the victims (its success), with and without the detector.

The audit schedule is drawn from the OS CSPRNG, so numbers vary a little from run to run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from suite.engine.models import load_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat


def _cfg(model: str, steps: int, clients: int, finetune: str = "lora"):
    return parse_config({
        "model": {"name": model},
        "data": {"max_length": 12, "private": {"generator": "records", "size": 16, "seed": 1},
                 "shadow": {"generator": "records", "size": 64, "seed": 2}},
        "training": {"clients": clients, "steps": steps, "batch_size": 4, "finetune": finetune},
    })


def audit_run(base, model: str, steps: int, tamper: dict, audit: dict) -> dict:
    threat = get_threat("malicious_server")
    attack = make_attack("tampering", threat, tamper)
    defense = make_defense("integrity_audit", audit)
    train_split(_cfg(model, steps, 1), SplitSpec(1, 1), base, threat, attack, defense)
    policy = attack.policy
    seen = {(s, w) for s, w in policy.seen if tamper.get("target", "hidden") in (w, "both")}
    truth = set(policy.tampered)
    flagged = defense.flagged_steps()
    # A flagged hidden-state step stops that step (the client rejects and sends no real gradient), so only
    # count the replies the verifier actually saw: a gradient after a rejected hidden reply is not checked.
    caught = truth & flagged
    clean = seen - truth
    return {**tamper, **audit, "tampered": len(truth), "recall": len(caught) / len(truth) if truth else None,
            "false_positive_rate": len(flagged & clean) / len(clean) if clean else 0.0, "replies": len(seen),
            "extra_compute": round(defense.report()["extra_compute"], 4)}


def fsha_run(base, model: str, steps: int, mix: float, detector: bool) -> dict:
    threat = get_threat("malicious_server")
    attack = make_attack("fsha", threat, {"honest_mix": mix})
    defense = make_defense("fsha_detector") if detector else make_defense("none")
    cfg = _cfg(model, steps, 2, "full")
    trained = train_split(cfg, SplitSpec(1, 1), base, threat, attack, defense)
    result = attack_trained(trained, threat, attack, cfg)
    report = defense.report() if detector else {}
    return {"honest_mix": mix, "detector": detector, "detected": report.get("detected"),
            "detected_at_step": report.get("detected_at_step"),
            "token_accuracy": round(result.metrics.token_accuracy, 4), "rouge1": round(result.metrics.rouge1, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suite.harness.audit_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--steps", type=int, default=60, help="training steps per audit run")
    parser.add_argument("--fsha-steps", type=int, default=25, help="training steps per FSHA run")
    parser.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    parser.add_argument("--skip-fsha", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = load_model(args.model)
    rows: dict[str, list[dict]] = {"audit": [], "fsha": []}
    start = time.perf_counter()

    def show(row: dict) -> None:
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)

    print("integrity_audit vs tampering (target hidden; audit_rate = full-audit probability per step)")
    grid = []
    for adaptive in (False, True):
        for rate in (0.1, 0.3, 0.6, 1.0):
            grid.append(({"target": "hidden", "mode": "random", "rate": rate, "adaptive": adaptive},
                         {"audit_rate": 0.05}))
    for scale in (1e-4, 1e-3, 1e-2, 0.1, 1.0):
        grid.append(({"target": "hidden", "mode": "scaled_noise", "scale": scale, "rate": 0.5, "adaptive": True},
                     {"audit_rate": 0.25}))
    for rate in (0.3, 1.0):
        grid.append(({"target": "hidden", "mode": "random", "rate": rate, "adaptive": True}, {"audit_rate": 0.25}))
    for scale in (1e-3, 1e-2, 0.1, 1.0):
        grid.append(({"target": "gradient", "mode": "scaled_noise", "scale": scale, "rate": 0.5, "adaptive": True},
                     {"audit_rate": 0.25}))
    grid.append(({"target": "hidden", "mode": "random", "rate": 0.0}, {"audit_rate": 0.25}))  # honest: FPR only
    for tamper, audit in grid:
        row = audit_run(base, args.model, args.steps, tamper, audit)
        rows["audit"].append(row)
        show(row)
    if not args.skip_fsha:
        print("fsha_detector vs FSHA mixing in the honest gradient (w = honest_mix)")
        for mix in (0.0, 0.25, 0.5, 0.75, 0.9):
            for detector in (True, False):
                row = fsha_run(base, args.model, args.fsha_steps, mix, detector)
                rows["fsha"].append(row)
                show(row)
    print(f"audit_bench: {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
