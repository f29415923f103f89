"""The training budget at which NoPeek acts on the default matrix's setting (BENCHMARKS.md, "NoPeek: the
training budget at which it acts").

Trains the default matrix's k = 1 split (its model, data and training, with ``training.steps`` replaced) under
one defense and prints the distance correlation of every head pass (two a step with the default's 2 clients),
then one JSON line with the held-out perplexity and the defense's report:

    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/scripts/nopeek_budget.py 100 nopeek '{"alpha": 50}'

There is no learning-rate schedule, so the first 2N passes of a 100-step run are an N-step run's.
"""

import json
import sys
import time

import torch

from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import DEFAULT_MATRIX, load_config
from suite.experiment.prepared import load_for
from suite.interfaces.defense import make_defense


def main() -> None:
    steps, name, params = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
    torch.set_num_threads(1)
    cfg = load_config(DEFAULT_MATRIX)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"steps": steps})})
    base = load_for(cfg)
    start = time.time()
    defense = make_defense(name, params)
    if hasattr(defense, "_loss") and hasattr(defense, "history"):  # NoPeek: print its trace as it trains
        loss = defense._loss

        def traced(head_out, embeds, batch):
            value = loss(head_out, embeds, batch)
            print("dcor", len(defense.history), round(defense.history[-1], 5), round(time.time() - start),
                  flush=True)
            return value

        defense._loss = traced
    trained = train_split(cfg, SplitSpec(1, 1), base, defense=defense, reference=False)
    print(json.dumps({"steps": steps, "defense": name, "params": params, "perplexity": trained.perplexity,
                      "report": defense.report(), "history": getattr(defense, "history", []),
                      "seconds": time.time() - start}), flush=True)


if __name__ == "__main__":
    main()
