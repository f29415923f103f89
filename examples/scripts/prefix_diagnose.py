"""Train once at depth k, then run prefix_invert variants on the same capture, with a diagnosis of every wrong token.

  PYTHONPATH=. python examples/scripts/prefix_diagnose.py 8 '[{}, {"early_positions": 1}]' 1 \
      '{"path": "/tmp/heldout.txt", "limit": 16}' [gemma3-270m]

Arguments: k, a JSON list of PrefixInversionConfig overrides (``"diag": false`` skips the diagnosis), torch
threads, the victims' corpus section (default: the first 16 lines of examples/data/licenses.txt), the model
(default smollm2-135m). Each variant prints its accuracy, time and wall seconds by phase. Per wrong token
it prints the truth and the choice, both verified with the *true* prefix ("forced": what the search would have
seen had everything before been right), whether the recovered prefix was right, and the truth's rank under the
public LM given the true prefix. A truth that scores above the choice was never proposed (a candidate problem);
one that scores below it needs the outputs after it (a scoring problem).
"""
import json
import sys
import time

import torch

import attacks  # noqa: F401
from attacks.prefix_inversion import PrefixInversionConfig
from attacks.toolkit.observe import reference_parts, run_head, shadow_batch, stacked, start_token
from attacks.toolkit.prefix.invert import prefix_invert
from attacks.toolkit.prefix.options import PrefixOptions
from attacks.toolkit.prefix.scorer import Scorer
from attacks.toolkit.prefix.search import PrefixSearch
from suite.engine.models import load_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import _observations, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat

k = int(sys.argv[1])
variants = json.loads(sys.argv[2])
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
private = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {"path": "examples/data/licenses.txt", "limit": 16}
model = sys.argv[5] if len(sys.argv) > 5 else "smollm2-135m"
torch.set_num_threads(threads)
cfg = parse_config({"model": {"name": model},
                    "data": {"max_length": 32, "private": private, "held_out": 16,
                             "shadow": {"generator": "records", "size": 256, "seed": 2}},
                    "training": {"clients": 2, "steps": 10, "batch_size": 4}})
base = load_model(model)
threat = get_threat("curious_server")
t0 = time.time()
trained = train_split(cfg, SplitSpec(k, 1), base, defense=make_defense("none", {}))
print("train", time.time() - t0, flush=True)
cap = trained.capture.of([0, 1])
attack = make_attack("prefix_inversion", threat, {})
obs = _observations(threat, trained.prepared.session.split.spec, trained.base, cfg, trained.shadow, trained.prepared,
                    cap, trained.defense, attack)
target, mask = stacked(obs)
truth = cap.true_ids
real = mask.bool()
for v in variants:
    c = PrefixInversionConfig(**{a: b for a, b in v.items() if a != "diag"})
    t0, c0 = time.time(), time.process_time()
    ids, extra = prefix_invert(obs, c.options(), target, mask)
    wall, cpu = time.time() - t0, time.process_time() - c0
    wrong = (ids != truth) & real
    acc = 1 - wrong.sum().item() / real.sum().item()
    pos = wrong.nonzero().tolist()
    print(json.dumps({"variant": v, "acc": round(acc, 4), "wrong": int(wrong.sum()), "wall": round(wall, 1),
                      "cpu": round(cpu, 1), "pos": pos,
                      "stats": {kk: extra.get(kk) for kk in ("widened_positions", "verified", "mean_score",
                                                             "first_tokens_changed", "early_tokens_changed",
                                                             "ties_changed")},
                      "seconds_by_phase": extra.get("seconds_by_phase")}),
          flush=True)
    # the diagnosis: teacher-forced score of truth vs chosen at each wrong position (true prefix)
    if pos and v.get("diag", True):
        parts = reference_parts(obs, True)
        head, config, lm = parts.head, parts.model.config, parts.model
        st = start_token(obs.tokenizer)
        with torch.no_grad():
            lmlog = lm(input_ids=torch.cat([torch.full((truth.shape[0], 1), st), truth], 1)).logits[:, :-1].float()
        sh = shadow_batch(obs)
        scorer = Scorer.fit(run_head(head, *sh), sh[1], None, 1.0)
        search = PrefixSearch(head, config, scorer, PrefixOptions())
        cand = torch.stack([truth, ids], -1)
        forced = search.forced(target, mask, cand, truth)
        for n, t in pos:
            prefix_ok = bool((ids[n, :t] == truth[n, :t]).all())
            rank = int((lmlog[n, t] > lmlog[n, t, truth[n, t]]).sum())
            print(f"    seq {n} pos {t}: truth {obs.tokenizer.decode([int(truth[n, t])])!r} "
                  f"got {obs.tokenizer.decode([int(ids[n, t])])!r}  forced truth {forced[n, t, 0]:.4f} "
                  f"chosen {forced[n, t, 1]:.4f}  prefix_ok {prefix_ok}  lm_rank {rank}", flush=True)
