"""Print leakage versus split depth (and model) from one or more result stores as markdown tables.

    python examples/scripts/depth_table.py runs/depth-records runs/depth-natural       # the depth tables
    python examples/scripts/depth_table.py runs/family-smollm2 runs/family-gemma3      # leakage vs family and size

One table per (store's data, threat): a row per attack, the blind baseline last; a column per (model, k). Each
cell is the attack's token accuracy with its 95 % bootstrap interval and, below blind, its advantage over the
blind baseline on the same records. Undefended cells only. Failed cells read "failed"; cells the threat
does not grant are blank. A last row gives each column's cost: the split model's held-out perplexity beside
its centralised reference's, where the store recorded them.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from reports.tables import prepare
from suite.experiment.store import load_results


def _cell(r: pd.Series | None) -> str:
    if r is None:
        return ""
    if not r["ok"]:
        return "failed"
    text = f"{r['token_accuracy']:.3f}"
    lo, hi = r.get("token_accuracy_lo"), r.get("token_accuracy_hi")
    if pd.notna(lo) and pd.notna(hi):
        text += f" [{lo:.2f}, {hi:.2f}]"
    adv = r.get("adv_token_accuracy")
    if r["attack"] != "blind" and pd.notna(adv):
        text += f" ({adv:+.2f})"
    return text


def _perplexity(g: pd.DataFrame) -> str:
    """The column's held-out perplexity, split / centralised reference: the median over its rows (the passive
    attacks' cells share one honest training run; an active attack such as ``fsha`` trains its own, hijacked
    one, which the median leaves out), from the held-out loss where no row has a perplexity (a multi-seed
    store's aggregate rows); "" without either."""
    def mean_ppl(ppl: str, loss: str) -> float | None:
        value = g[ppl].median() if ppl in g else float("nan")
        if pd.isna(value) and loss in g and pd.notna(g[loss].median()):
            value = math.exp(g[loss].median())
        return None if pd.isna(value) else float(value)

    split, ref = mean_ppl("perplexity", "utility"), mean_ppl("perplexity_centralised", "utility_centralised")
    if split is None:
        return ""
    return f"{split:.2f} / " + (f"{ref:.2f}" if ref is not None else "–")


def main(directories: list[str]) -> None:
    frames = []
    for d in directories:
        df = load_results(d)
        df["store"] = Path(d).name
        frames.append(df)
    df = prepare(pd.concat(frames, ignore_index=True))
    df = df[df["defense"] == "none"]
    models = list(dict.fromkeys(df["model"]))
    for threat in dict.fromkeys(df["threat"]):
        g = df[df["threat"] == threat]
        cols = [(m, k) for m in models for k in sorted(g[g["model"] == m]["head_blocks"].unique())]
        attacks = [a for a in dict.fromkeys(g["attack_label"]) if a != "blind"] + ["blind"]
        print(f"**{threat}** ({', '.join(dict.fromkeys(g['store']))}): token accuracy [95 % CI] "
              "(advantage over blind)\n")
        multi = len(models) > 1
        print("| attack | " + " | ".join((f"{m} " if multi else "") + f"k = {k}" for m, k in cols) + " |")
        print("| --- " * (1 + len(cols)) + "|")
        for a in attacks:
            row = []
            for m, k in cols:
                hit = g[(g["attack_label"] == a) & (g["model"] == m) & (g["head_blocks"] == k)]
                row.append(_cell(hit.iloc[-1] if len(hit) else None))
            print(f"| {a} | " + " | ".join(row) + " |")
        cost = [_perplexity(g[(g["model"] == m) & (g["head_blocks"] == k)]) for m, k in cols]
        if any(cost):
            print("| held-out perplexity, split / centralised | " + " | ".join(cost) + " |")
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python examples/scripts/depth_table.py STORE_DIR [STORE_DIR ...]")
    main(sys.argv[1:])
