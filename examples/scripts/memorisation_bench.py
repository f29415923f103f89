"""Memorisation on a real model without the matrix's centralised reference: train one split once, then run the
memorisation attacks on each threat's view and print one JSON line per (threat, attack) with the columns the
store would get, plus the held-out loss before and after training (the budget must make it fall).

    PYTHONPATH=. python examples/scripts/memorisation_bench.py --model smollm2-135m --strategy per_client \\
        --finetune lora --steps 6 --size 32 --held-out 16 --count 2 --repeats 1 8 \\
        --threats adapter_thief model_user --attacks membership extraction
"""

from __future__ import annotations

import argparse
import json
import time

from suite.engine.split import SplitSpec
from suite.engine.training import eval_loss
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.experiment.memorisation import memorisation_fields
from suite.experiment.prepared import load_for, prepare
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--strategy", default="per_client")
    p.add_argument("--finetune", default="lora", help="clients' and server's fine-tuning: lora or full")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA's rate")
    p.add_argument("--full-lr", type=float, help="the rate under --finetune full (default: --lr)")
    p.add_argument("--size", type=int, default=32, help="private records (split over 2 clients)")
    p.add_argument("--held-out", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--repeats", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threats", nargs="+", default=["adapter_thief", "model_user"])
    p.add_argument("--attacks", nargs="+", default=["membership", "extraction"])
    p.add_argument("--attack-param", action="append", default=[], help="attack:key=value (JSON value)")
    p.add_argument("--defense", default="none")
    p.add_argument("--defense-param", action="append", default=[], help="key=value (JSON value)")
    a = p.parse_args()
    cfg = parse_config({
        "model": {"name": a.model},
        "data": {"max_length": a.max_length, "private": {"generator": "records", "size": a.size, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}, "held_out": a.held_out,
                 "canaries": {"count": a.count, "repeats": a.repeats}},
        "training": {"strategy": a.strategy, "clients": 2, "steps": a.steps, "batch_size": a.batch_size,
                     "lr": a.lr, "full_lr": a.full_lr, "finetune": a.finetune, "server_finetune": a.finetune}})
    base = load_for(cfg, progress=lambda _: None)
    start = time.perf_counter()
    untrained = prepare(cfg, SplitSpec(1, 1), loaded=base)
    before = eval_loss(untrained.session, untrained.eval_data, client_id=1)
    del untrained
    dparams = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.defense_param)}
    defense = make_defense(a.defense, dparams)
    trained = train_split(cfg, SplitSpec(1, 1), base, defense=defense, reference=False)
    print(json.dumps({"trained_seconds": round(time.perf_counter() - start, 1), "held_out_loss_before": before,
                      "held_out_loss_after_client0": trained.utility, "defense": a.defense,
                      "defense_report": defense.report()}), flush=True)
    aparams: dict[str, dict] = {}
    for s in a.attack_param:
        name, kv = s.split(":", 1)
        k, v = kv.split("=", 1)
        aparams.setdefault(name, {})[k] = json.loads(v)
    for threat_name in a.threats:
        threat = get_threat(threat_name)
        for attack_name in a.attacks:
            attack = make_attack(attack_name, threat, aparams.get(attack_name))
            f = memorisation_fields(trained, threat, attack, cfg)
            m = f.pop("memorisation")
            m.pop("roc", None)
            keep = {k: v for k, v in f.items() if k.split("_lo")[0].split("_hi")[0] in
                    ("exposure", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "extracted")}
            print(json.dumps({"threat": threat_name, "attack": attack_name, "seconds": round(f["attack_seconds"], 1),
                              **keep, "memorisation": m}, default=str), flush=True)


if __name__ == "__main__":
    main()
