"""Hand-written results stores for the report, verdict and gate tests: sweeps (a defense at several settings),
intervals, advantage over a blind attack, adaptive and non-adaptive rows, NULLs where an older store has none.

``sweep_rows()`` describes one model at splits k = 0, 1, 2 with two threats:

* curious_server runs ``inv`` (activations, strong) and ``grad`` (gradients), eavesdropper runs ``wire``; both
  run ``blind`` (token accuracy 0.10 everywhere);
* no defense: inv recovers 0.95 / 0.90 / 0.60 at k = 0 / 1 / 2, wire 0.95 / 0.90 / 0.60; grad 0.70;
* dxp eta = 10, 30, 100 (stronger noise, more cost): eta=10 brings inv to 0.30 and grad to 0.12 at +40 %
  perplexity; eta=30 to 0.13 / 0.12 at +12 %; eta=100 leaves 0.60 at +3 %;
* nopeek alpha = 0.5: dCor 0.9995 -> 0.9989, leakage and utility equal to no defense (it did not act);
* encryption: eavesdropper's wire drops to blind level (advantage 0), curious_server unchanged.
"""

from __future__ import annotations

import math

from suite.experiment.store import ResultsStore

CONFIG = {"model": {"name": "m"}, "data": {"max_length": 8}, "training": {"steps": 2}}
BLIND_ACC = 0.10
BASE_LOSS = {0: 3.0, 1: 3.1, 2: 3.2}
W = 0.02  # half-width of every leakage interval


def cell(key, k, threat, attack, defense, dparams=None, *, acc, loss, adaptive=None, adv=True, intervals=True,
         report=None, aparams=None):
    row = {"key": key, "model": "m", "revision": "r1", "head_blocks": k, "tail_blocks": 1, "strategy": "serial",
           "threat": threat, "attack": attack, "attack_params": aparams or {}, "defense": defense,
           "defense_params": dparams or {}, "seed": 0, "config": CONFIG, "versions": {"python": "3.11"},
           "status": "ok", "error": None, "note": "", "attack_seconds": 0.1, "attack_peak_rss_mib": 100.0,
           "bleu4": 100 * acc, "rouge1": 100 * acc, "rouge2": 100 * acc, "rougeL": 100 * acc,
           "token_accuracy": acc, "exact_match": acc / 2, "pii_recovery": acc / 2, "utility": loss,
           "adaptive": adaptive, "defense_report": report or {},
           "samples": [{"reference": f"secret text {key}", "reconstruction": f"guess {key} k={k}", "pii": {}}]}
    if intervals:
        for m in ("bleu4", "rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match", "pii_recovery"):
            scale = 100 if m.startswith(("bleu", "rouge")) else 1
            v = row[m]
            row[f"{m}_lo"], row[f"{m}_hi"] = max(0.0, v - W * scale), min(scale, v + W * scale)
        row["utility_lo"], row["utility_hi"] = loss - 0.01, loss + 0.01
    if adv:
        a = acc - BLIND_ACC if attack != "blind" else 0.0
        row["adv_token_accuracy"] = a
        row["adv_token_accuracy_lo"], row["adv_token_accuracy_hi"] = (a - W, a + W) if attack != "blind" else (0, 0)
    return row


DXP = {10: (0.30, 0.12, 0.40), 30: (0.13, 0.12, 0.12), 100: (0.60, 0.60, 0.03)}  # eta: inv, grad, cost


def sweep_rows(*, adv=True, intervals=True):
    rows = []
    none_inv = {0: 0.95, 1: 0.90, 2: 0.60}
    for k in (0, 1, 2):
        loss = BASE_LOSS[k]
        kw = {"adv": adv, "intervals": intervals}
        for threat in ("curious_server", "eavesdropper"):
            rows.append(cell(f"blind-{threat}-{k}", k, threat, "blind", "none", acc=BLIND_ACC, loss=loss, **kw))
        rows += [cell(f"inv-{k}", k, "curious_server", "inv", "none", acc=none_inv[k], loss=loss, **kw),
                 cell(f"grad-{k}", k, "curious_server", "grad", "none", acc=0.70, loss=loss, **kw),
                 cell(f"wire-{k}", k, "eavesdropper", "wire", "none", acc=none_inv[k], loss=loss, **kw)]
        for eta, (inv, grad, cost) in DXP.items():
            dl = loss + math.log(1 + cost)
            for attack, acc in (("inv", inv), ("grad", grad)):
                rows.append(cell(f"dxp{eta}-{attack}-{k}", k, "curious_server", attack, "dxp", {"eta": eta},
                                 acc=acc, loss=dl, **kw))
            rows.append(cell(f"dxp{eta}-wire-{k}", k, "eavesdropper", "wire", "dxp", {"eta": eta}, acc=inv,
                             loss=dl, **kw))
        nopeek = {"dcor_first": 0.9995, "dcor_last10_mean": 0.9989}
        rows += [cell(f"nopeek-inv-{k}", k, "curious_server", "inv", "nopeek", {"alpha": 0.5}, acc=none_inv[k],
                      loss=loss + 0.001, report=nopeek, **kw),
                 cell(f"nopeek-grad-{k}", k, "curious_server", "grad", "nopeek", {"alpha": 0.5}, acc=0.70,
                      loss=loss + 0.001, report=nopeek, **kw),
                 cell(f"nopeek-wire-{k}", k, "eavesdropper", "wire", "nopeek", {"alpha": 0.5}, acc=none_inv[k],
                      loss=loss + 0.001, report=nopeek, **kw),
                 cell(f"enc-inv-{k}", k, "curious_server", "inv", "encryption", acc=none_inv[k], loss=loss, **kw),
                 cell(f"enc-wire-{k}", k, "eavesdropper", "wire", "encryption", acc=BLIND_ACC, loss=loss, **kw)]
    return rows


def write_store(path, rows):
    with ResultsStore(path) as store:
        for row in rows:
            store.write(row)
    return path
