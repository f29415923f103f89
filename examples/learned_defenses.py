"""Privacy-utility of the learned defenses (mid, bottleneck, santext) and leakage vs training steps.

    PYTHONPATH=. python examples/learned_defenses.py table --out runs/learned-defenses.json
    PYTHONPATH=. python examples/learned_defenses.py steps --steps 0 50 200 --out runs/steps.json
    PYTHONPATH=. python examples/learned_defenses.py render runs/learned-defenses.json   # markdown rows

``table``: SmolLM2-135M, k = 1, curious server, 16 private records, each defense at 3 settings (and none).
Per cell: held-out loss / perplexity under the deployed defense (64 held-out records), the centralised LoRA
reference, and leakage of nearest_embedding, learned_inversion (linear, as shipped: fitted on the public
head's plain outputs) and an adaptive learned_inversion (linear) fitted on the defense's attacker simulation
(``simulate_head`` + ``simulate_release`` on shadow text with the attacker's own randomness), the adversary
who read the defense's code. ``steps``: no defense, client head and tail fully fine-tuned, leakage of the
same attacks after 0 / 50 / 200 training steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import attacks.learned_inversion as li
from attacks._common import public_head
from suite.engine.models import load_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat

SETTINGS = {
    "none": [{}],
    "bottleneck": [{"rank": 4}, {"rank": 32}, {"rank": 128}],
    "mid": [{"lam": 0.001}, {"lam": 0.1}, {"lam": 10.0}],
    "santext": [{"epsilon": 3.0}, {"epsilon": 6.0}, {"epsilon": 9.0}],
}


def config(steps: int, finetune: str = "lora", records: int = 16):
    return parse_config({
        "data": {"max_length": 32, "private": {"generator": "records", "size": records, "seed": 1},
                 "shadow": {"generator": "records", "size": 256, "seed": 2}, "held_out": 64},
        "training": {"clients": 2, "steps": steps, "batch_size": 4, "finetune": finetune},
    })


def adaptive_pairs(obs, use_colluder=True):
    """learned_inversion's training pairs, produced through the defense's public simulation: the attacker's
    own head trained under the defense on shadow text, then what that head would release under it."""
    head = public_head(obs)
    ids, mask = li._tokenize(obs, tuple(obs.shadow))
    gen = torch.Generator().manual_seed(12345)  # the attacker's own randomness
    sim = obs.defense.simulate_head(head, ids, mask, gen)
    feats = torch.cat([obs.defense.simulate_release(sim, ids[lo:lo + 64], mask[lo:lo + 64], gen).float()
                       for lo in range(0, ids.shape[0], 64)])
    return li._Pairs(feats, ids, mask, {"simulated x shadow": ids.shape[0]}), head


def attack_all(trained, cfg) -> dict:
    threat = get_threat("curious_server")
    out = {}
    for label, name, params, adaptive in (("nearest_embedding", "nearest_embedding", {}, False),
                                          ("learned_inversion_linear", "learned_inversion", {"mode": "linear"}, False),
                                          ("learned_inversion_linear_adaptive", "learned_inversion",
                                           {"mode": "linear"}, True)):
        original = li.training_pairs
        if adaptive:
            li.training_pairs = adaptive_pairs
        try:
            res = attack_trained(trained, threat, make_attack(name, threat, params), cfg)
        finally:
            li.training_pairs = original
        m = res.metrics
        out[label] = {"token_accuracy": m.token_accuracy, "rougeL": m.rougeL, "pii_recovery": m.pii_recovery}
    return out


def render(paths: list[str]) -> str:
    """Markdown rows from the JSON files this script wrote."""
    lines = ["| defense | setting | held-out loss | perplexity (vs centralised) | nearest_embedding | "
             "learned_inversion linear | adaptive linear | defense report |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [r for path in paths for r in json.load(open(path))]
    reference = next((r["perplexity_centralised"] for r in rows if "perplexity_centralised" in r), None)
    for path in paths:
        for r in json.load(open(path)):
            a = r["attacks"]

            def cell(k, a=a):
                m = a[k]
                pii = "-" if m["pii_recovery"] is None else f"{m['pii_recovery']:.2f}"
                return f"{m['token_accuracy']:.2f} / {m['rougeL']:.1f} / {pii}"

            ref = r.get("perplexity_centralised", reference)
            rel = f"{100 * (r['perplexity'] / ref - 1):+.0f} %" if ref else "n/a"
            rep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r["defense_report"].items()}
            lines.append(f"| {r['defense']} | {json.dumps(r['params'])} | {r['utility']:.3f} | "
                         f"{r['perplexity']:.1f} ({rel}) | {cell('nearest_embedding')} | "
                         f"{cell('learned_inversion_linear')} | {cell('learned_inversion_linear_adaptive')} | "
                         f"{json.dumps(rep)} |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["render"]:
        print(render(sys.argv[2:]))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["table", "steps"])
    parser.add_argument("--steps", type=int, nargs="*", default=[0, 50, 200])
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--pick", type=int, default=None, help="only this setting (index) of each defense")
    parser.add_argument("--no-reference", action="store_true", help="skip the centralised reference")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_model("smollm2-135m")
    rows = []
    if args.part == "table":
        jobs = [(name, p, config(args.train_steps)) for name, ps in SETTINGS.items()
                if args.only is None or name in args.only for i, p in enumerate(ps)
                if args.pick is None or i == args.pick]
    else:
        jobs = [("none", {"steps": s}, config(s, "full")) for s in args.steps]
    for name, params, cfg in jobs:
        start = time.time()
        dparams = {} if args.part == "steps" else params
        trained = train_split(cfg, SplitSpec(1, 1), base, defense=make_defense(name, dparams),
                              reference=args.part == "table" and not args.no_reference)
        row = {"defense": name, "params": params, "utility": trained.utility, "perplexity": trained.perplexity,
               **trained.reference, "defense_report": trained.defense.report(),
               "train_loss_last": sum(trained.prepared.session.losses[-1]) / 2 if trained.prepared.session.losses else None}
        row["attacks"] = attack_all(trained, cfg)
        row["seconds"] = time.time() - start
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
