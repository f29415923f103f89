"""Measure prefix_inversion and bisr on SmolLM2-135M; results go to BENCHMARKS.md.

  # prefix inversion: 16 natural-text victims (licenses.txt), shadow = generated records (another domain)
  PYTHONPATH=. python examples/scripts/prefix_bench.py target -k 1 2 4 8 15
  # the time target (<= 120 s per cell at k <= 8 on 2 cores): alone on the machine, both cores
  PYTHONPATH=. python examples/scripts/prefix_bench.py target -k 4 8 --threads 2
  # held-out text (never developed on): docstrings of the Python standard library
  python examples/scripts/heldout_text.py > /tmp/heldout.txt   # Python standard-library docstrings
  PYTHONPATH=. python examples/scripts/prefix_bench.py target -k 8 --private '{"path": "/tmp/heldout.txt", "limit": 16}'
  # the time ratio against the search without the second widening bar, on the same capture
  PYTHONPATH=. python examples/scripts/prefix_bench.py target -k 8 --threads 2 --compare '{"widen_again_below": 0.98}'
  # the second family: the same cells on Gemma 3 270M, on text held out from the Gemma work
  python examples/scripts/heldout_text.py reference > /tmp/reference.txt   # sha256 518e4404...cbae07 (Python 3.11.7)
  PYTHONPATH=. python examples/scripts/prefix_bench.py target -k 1 2 4 8 --threads 2 --model gemma3-270m \
      --private '{"path": "/tmp/reference.txt", "limit": 16}' [--attacks prefix_inversion bisr]
  # bisr vs forward-only vs gradient-only on defended cells (default-matrix sizes: 16 records, 6 steps)
  PYTHONPATH=. python examples/scripts/prefix_bench.py fused -k 1 --defense dp_gaussian '{"sigma": 0.5, "clip": 1.0}'

Each line printed is one cell: token accuracy, wall seconds and CPU seconds of the attack (the machine is
shared: CPU seconds are the attack's own work, wall seconds include waiting for the CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attacks  # noqa: F401  (registers the attacks)
from suite.engine.models import load_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["target", "fused"])
    p.add_argument("-k", type=int, nargs="+", required=True)
    p.add_argument("--private", default=None, help="JSON corpus section for the victims")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 10 target, 6 fused)")
    p.add_argument("--defense", nargs=2, action="append", default=[], metavar=("NAME", "JSON"))
    p.add_argument("--params", default="{}", help="JSON attack parameters for prefix_inversion / bisr")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared-machine figures)")
    p.add_argument("--compare", default=None,
                   help="JSON prefix_inversion parameters run on the same capture too; prints the time ratio")
    p.add_argument("--model", default="smollm2-135m", help="model name (e.g. gemma3-270m: the second family)")
    p.add_argument("--attacks", nargs="+", default=None,
                   help="attacks run on each capture (target: prefix_inversion; fused: gradient_inversion, "
                        "prefix_inversion, bisr)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "target":
        private = json.loads(args.private) if args.private else {"path": "examples/data/licenses.txt", "limit": 16}
        steps = args.steps or 10
    else:
        private = json.loads(args.private) if args.private else {"generator": "records", "size": 16, "seed": 1}
        steps = args.steps or 6
    cfg = parse_config({"model": {"name": args.model},
                        "data": {"max_length": 32, "private": private, "held_out": 16,  # utility is not the point here
                                 "shadow": {"generator": "records", "size": 256, "seed": 2}},
                        # the utility reference is not the point here and costs a second training run
                        "training": {"clients": 2, "steps": steps, "batch_size": 4}})
    base = load_model(args.model)
    threat = get_threat("curious_server")
    params = json.loads(args.params)
    defenses = [(n, json.loads(j)) for n, j in args.defense] or [("none", {})]
    names = args.attacks or (["prefix_inversion"] if args.mode == "target"
                             else ["gradient_inversion", "prefix_inversion", "bisr"])
    for k in args.k:
        for dname, dparams in defenses:
            start = time.perf_counter()
            trained = train_split(cfg, SplitSpec(k, 1), base, defense=make_defense(dname, dparams))
            train_s = time.perf_counter() - start
            for name in names:
                attack = make_attack(name, threat, params if name != "gradient_inversion" else {})
                r = attack_trained(trained, threat, attack, cfg)
                ex = r.reconstruction.extra
                keep = {key: ex[key] for key in ("widened_positions", "positions", "verified", "mean_score",
                                                  "lambda", "shadow_accuracy_by_lambda", "known_prefix",
                                                  "seconds_by_phase") if key in ex}
                print(f"k={k} defense={dname}{dparams} attack={name} token_accuracy={r.metrics.token_accuracy:.4f} "
                      f"wall_s={r.cost.seconds:.1f} cpu_s={ex.get('cpu_seconds', float('nan')):.1f} "
                      f"train_wall_s={train_s:.0f} {keep}", flush=True)
                if args.compare and name == "prefix_inversion":
                    other = attack_trained(trained, threat, make_attack(name, threat, json.loads(args.compare)), cfg)
                    print(f"  same capture with {args.compare}: token_accuracy={other.metrics.token_accuracy:.4f} "
                          f"wall_s={other.cost.seconds:.1f}; time ratio defaults / that = "
                          f"{r.cost.seconds / other.cost.seconds:.2f}", flush=True)


if __name__ == "__main__":
    main()
