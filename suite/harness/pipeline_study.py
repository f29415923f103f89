"""The seed paper's case study (Lu et al. 2023): one malicious stage among S pipeline stages.

    python -m suite.harness.pipeline_study                     # tiny random-weight llama, minutes on 2 cores
    python -m suite.harness.pipeline_study --json out.json --stages 2 4 8 --rates 0.1 0.5 1.0

A model whose trunk is split into S stage parties (``[training] stages = S``) trains with the ``tampering``
policy on one stage (threat ``malicious_stage:i``, by default the middle one). It perturbs what that stage
sends forward (``hidden``), backward (``gradient``) or both, on a seeded fraction ``rate`` of its replies:

* ``scaled_noise`` — Gaussian noise of std ``scale`` x the tensor's std (the paper's code adds random noise);
* ``sign_flip`` — the tensor negated;
* ``targeted`` — a shift along one fixed direction (``scale`` x a typical position's norm).

Per run: the training loss curve (what the clients saw, tampered replies included) and the held-out loss
curve of the model evaluated honestly every ``eval_every`` steps, beside the clean run's (same data order,
same seed); the final held-out perplexity (the damage training took, not the tampering at inference); and
the steps until divergence: the first evaluated step whose held-out loss is non-finite or above ``1 +
margin`` times the clean run's there (None: not within the budget). The training loss is not used for
divergence: a forward-tampered step shows a spike there that says nothing of the model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Sequence

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.engine.training import eval_loss, train
from suite.experiment.cell import install_policy
from suite.experiment.config import parse_config
from suite.experiment.prepared import prepare
from suite.experiment.utility import perplexity
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import filter_observations, get_threat

MARGIN = 0.25  # divergence: the held-out loss above (1 + MARGIN) x the clean run's
EVAL_EVERY = 5


def study_config(stages: int, steps: int, clients: int = 2, lr: float = 3e-3):
    return parse_config({
        "model": {"name": "tiny-llama"},
        # enough records that 40 steps of 2 x 4 sequences see each once at most: no overfitting in the clean run
        "data": {"max_length": 16, "held_out": 32, "private": {"generator": "records", "size": 512, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": clients, "steps": steps, "batch_size": 4, "stages": stages, "lr": lr,
                     "finetune": "full", "server_finetune": "full", "strategy": "batch_parallel"},
    })


def run_once(base, stages: int, steps: int, stage: int | None = None, tamper: dict | None = None,
             eval_every: int = EVAL_EVERY, audit_rate: float | None = None) -> dict:
    """One training run with ``stages`` stages, the ``tampering`` policy (``tamper``) on ``stage`` (default:
    the middle one) or none; its per-step mean loss and final held-out perplexity. ``audit_rate``: the
    ``transition_audit`` runs on that stage at this rate and acts (exclusion, standby from the last verified
    state)."""
    cfg = study_config(stages, steps)
    spec = SplitSpec(1, 1)
    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
    prepared = prepare(cfg, spec, loaded=loaded, keep_public=audit_rate is not None)
    policy = audit = None
    stage = stages // 2 if stage is None else stage
    if audit_rate is not None:
        audit = make_defense("transition_audit", {"rate": audit_rate, "stage": stage, "seed": 7919})
        audit.install(prepared.session)
    if tamper is not None:
        threat = get_threat(f"malicious_stage:{stage}")
        attack = make_attack("tampering", threat, tamper)
        public = filter_observations(threat, spec=spec, tokenizer=base.tokenizer, max_length=cfg.data.max_length)
        policy = attack.server_policy(public)
        install_policy(prepared.session.server, threat, policy)
    curve: list[tuple[int, float]] = []

    def evaluate(log) -> None:
        if (log.step + 1) % eval_every == 0 or log.step + 1 == steps:
            curve.append((log.step, eval_loss(prepared.session, prepared.eval_data)))

    start = time.perf_counter()
    logs = train(prepared.session, on_step=evaluate)
    seconds = time.perf_counter() - start
    losses = [_mean(log.losses) for log in logs]
    final = curve[-1][1] if curve else eval_loss(prepared.session, prepared.eval_data)
    out = {"stages": stages, "stage": stage, **(tamper or {}), "losses": losses, "eval_curve": curve,
           "final_loss": final, "perplexity": perplexity(final),
           "tampered": len([s for s, _ in policy.tampered if s < steps]) if policy else 0, "seconds": seconds}
    if audit is not None:
        r = audit.report()
        out["audit"] = {"rate": audit_rate, "audited": r["audited"], "flagged": r["flagged"],
                        "replacements": r["replacements"]}
    return out


def _mean(xs: Sequence[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if len(finite) == len(xs) else math.nan


def divergence_step(curve: Sequence[tuple[int, float]], clean: Sequence[tuple[int, float]],
                    margin: float = MARGIN) -> int | None:
    """The first step of ``curve`` ((step, held-out loss) pairs) whose loss is non-finite or above ``1 +
    margin`` times ``clean``'s at the same step; None when there is none within the run."""
    for (t, got), (t_clean, ref) in zip(curve, clean, strict=True):
        if t != t_clean:
            raise ValueError(f"curves evaluated at different steps ({t} vs {t_clean})")
        if not math.isfinite(got) or got > (1 + margin) * ref:
            return t + 1  # steps taken
    return None


def study(stage_counts: Sequence[int], kinds: Sequence[str], rates: Sequence[float], targets: Sequence[str],
          steps: int, scale: float, layers: int, seed: int = 0, on_row=None,
          audit_rate: float | None = None) -> list[dict]:
    """Every (S, kind, rate, target) run beside the clean run of its S; ``audit_rate``: every tampered run
    again under the transition audit at that rate, acting (``audited``: its perplexity, when it caught the
    stage and the steps lost)."""
    base = tiny_model("llama", num_layers=layers, seed=seed)
    rows = []
    for s in stage_counts:
        clean = run_once(base, s, steps)
        clean.update(kind="clean", divergence=None, extra_loss=0.0)
        rows.append(clean)
        if on_row:
            on_row(clean)
        for kind in kinds:
            for target in targets:
                for rate in rates:
                    tamper = {"mode": kind, "target": target, "rate": rate, "scale": scale, "seed": seed}
                    row = run_once(base, s, steps, tamper=tamper)
                    row.update(kind=kind, divergence=divergence_step(row["eval_curve"], clean["eval_curve"]),
                               extra_loss=row["final_loss"] - clean["final_loss"])
                    if audit_rate is not None:
                        row["audited"] = run_once(base, s, steps, tamper=tamper, audit_rate=audit_rate)
                    rows.append(row)
                    if on_row:
                        on_row(row)
    return rows


def table(rows: Sequence[dict]) -> str:
    """A markdown table: one line per run."""
    audited = any("audited" in r for r in rows)
    out = ["| S | stage | kind | target | rate | final ppl | clean ppl | steps to divergence | tampered replies |"
           + (" audited: final ppl | caught at step | steps lost |" if audited else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if audited else "")]
    clean = {r["stages"]: r for r in rows if r["kind"] == "clean"}
    for r in rows:
        if r["kind"] == "clean":
            continue
        c = clean[r["stages"]]
        div = "—" if r["divergence"] is None else str(r["divergence"])
        line = (f"| {r['stages']} | {r['stage']} | {r['kind']} | {r['target']} | {r['rate']} | "
                f"{r['perplexity']:.2f} | {c['perplexity']:.2f} | {div} | {r['tampered']} |")
        if "audited" in r:
            a = r["audited"]
            swaps = a["audit"]["replacements"]
            caught = str(swaps[0]["step"]) if swaps else "not caught"
            lost = str(swaps[0]["steps_lost"]) if swaps else "—"
            line += f" {a['perplexity']:.2f} | {caught} | {lost} |"
        out.append(line)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--kinds", nargs="+", default=["scaled_noise", "sign_flip", "targeted"])
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--targets", nargs="+", default=["both"], help="hidden (forward), gradient (backward), both")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--scale", type=float, default=1.0, help="noise / shift size relative to the tensor's std")
    p.add_argument("--layers", type=int, default=10, help="blocks of the tiny model (head 1, tail 1, trunk the rest)")
    p.add_argument("--audit-rate", type=float, help="also run every tampered setting under transition_audit")
    p.add_argument("--json", help="write every run (loss curves included) here")
    args = p.parse_args(argv)
    rows = study(args.stages, args.kinds, args.rates, args.targets, args.steps, args.scale, args.layers,
                 audit_rate=args.audit_rate, on_row=lambda r: print(f"S={r['stages']} {r['kind']} {r.get('target', '')} {r.get('rate', '')}: "
                                        f"ppl {r['perplexity']:.2f} divergence {r['divergence']}", flush=True))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
