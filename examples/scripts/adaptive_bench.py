"""Adaptive vs non-adaptive attackers under defences: one training run per defence setting,
then the same attack with ``adaptive = true`` and ``adaptive = false`` on the same capture.

    PYTHONPATH=. python examples/scripts/adaptive_bench.py [--attacks learned_inversion optimization_inversion]

SmolLM2-135M, k = 1, m = 1, 16 private sequences of natural text (examples/data/licenses.txt), shadow text = the rest
of that file, 6 LoRA steps; curious server. DxP at noise norm 0.5, 1 and 2 x the mean input-embedding norm
(E||z|| = H / eta, so eta = H / (f * mean norm)); dp_gaussian at three settings.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attacks", nargs="+", default=["learned_inversion"])
    ap.add_argument("--only", nargs="*", default=None, help="setting labels to run")
    ap.add_argument("--steps", type=int, default=6, help="LoRA training steps per setting")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = parse_config({
        "model": {"name": "smollm2-135m"},
        "data": {"max_length": 32, "private": {"path": "examples/data/licenses.txt", "limit": 16},
                 "shadow": {"path": "examples/data/licenses.txt"}},
        "training": {"clients": 2, "steps": args.steps, "batch_size": 4},
    })
    base = load_model(cfg.model.name, progress=lambda _: None)
    emb = base.model.get_input_embeddings().weight.detach()
    hsize, norm = emb.shape[1], float(emb.norm(dim=-1).mean())
    print(f"H = {hsize}, mean embedding norm = {norm:.4f}", flush=True)
    settings = [(f"dxp noise {f}x (eta={hsize / (f * norm):.1f})", "dxp", {"eta": hsize / (f * norm)})
                for f in (0.5, 1.0, 2.0)]
    settings += [(f"dp_gaussian sigma={s} clip={c}", "dp_gaussian", {"sigma": s, "clip": c})
                 for s, c in ((0.5, 1.0), (0.5, 0.0), (2.0, 0.0))]
    threat = get_threat("curious_server")
    params = {"learned_inversion": {"mode": "linear"}, "optimization_inversion": {"embed_steps": 20, "relax_steps": 40}}
    if args.only:  # in the order asked for
        settings = [s for o in args.only for s in settings if o in s[0]]
    for label, name, dparams in settings:
        t0 = time.perf_counter()
        trained = train_split(cfg, SplitSpec(1, 1), base, defense=make_defense(name, dparams))
        print(f"== {label}: held-out loss {trained.utility:.3f} (trained in {time.perf_counter() - t0:.0f} s); "
              f"{json.dumps(trained.defense.report())}", flush=True)
        for attack in args.attacks:
            for adaptive in (False, True):
                a = make_attack(attack, threat, {**params.get(attack, {}), "adaptive": adaptive})
                r = attack_trained(trained, threat, a, cfg)
                ex = r.reconstruction.extra
                print(f"   {attack:24s} adaptive={adaptive!s:5s} token_acc {r.metrics.token_accuracy:.3f} "
                      f"rougeL {r.metrics.rougeL:.3f} {r.cost.seconds:.0f} s "
                      f"choice={ex.get('choice')} prior_weight={ex.get('prior_weight')}", flush=True)


if __name__ == "__main__":
    main()
