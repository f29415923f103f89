"""Print a store's privacy-utility frontier as a markdown table, and each threat's verdict (as in report.pdf).

    python examples/scripts/frontier_table.py runs/learned-defenses

One row per (threat, defense setting, split): the strongest attack (the one with the highest upper interval
end), its leakage (advantage over the blind baseline where measured) with its 95 % interval, its raw token
accuracy, the blind baseline, held-out perplexity under the deployed defense and its cost against no defense
and against the centralised reference, whether the mechanism measurably acted, and whether the setting is on
the Pareto frontier. Then the report's words for each threat, and every attack's token accuracy per setting.
"""

from __future__ import annotations

import sys

from reports.frontier import pareto
from reports.frontier import settings as frontier_settings
from reports.tables import prepare
from reports.verdict import threat_verdict
from suite.experiment.store import load_results


def _f(v, fmt="{:.3f}") -> str:
    return "—" if v is None or v != v else fmt.format(v)


def main(directory: str) -> None:
    df = prepare(load_results(directory))
    s = frontier_settings(df)
    print("| threat | setting | split | strongest attack | leakage [95 % CI] | tokens | blind | held-out ppl | "
          "cost vs none [95 % CI] | vs centralised | acted | Pareto |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for threat, g in s.groupby("threat_label", sort=False):
        front = pareto(g[~g["is_none"]].dropna(subset=["cost"])) if (~g["is_none"]).any() else None
        for i, r in g.iterrows():
            on = "" if r["is_none"] or front is None else ("yes" if bool(front.get(i, False)) else "")
            pct = "{:+.0%}"
            print(f"| {threat} | {r['defense_label']} | {r['split']} | {r['attack_label']} | "
                  f"{_f(r['leak'])} [{_f(r['leak_lo'])}, {_f(r['leak_hi'])}] ({r['kind']}) | {_f(r['raw'])} | "
                  f"{_f(r['blind'])} | {_f(r['ppl'], '{:.1f}')} | {_f(r['cost'], pct)} "
                  f"[{_f(r['cost_lo'], pct)}, {_f(r['cost_hi'], pct)}] | {_f(r['cost_central'], pct)} | "
                  f"{'' if r['is_none'] else {True: 'yes', False: 'no'}.get(r['acted'], '?')} | {on} |")
    print()
    for threat, g in s.groupby("threat_label", sort=False):
        lvl, words = threat_verdict(g)
        print(f"- **{threat}** ({lvl}): " + " ".join(words))
    ok = df[df["ok"]]
    table = ok.pivot_table(index=["threat_label", "split", "defense_label"], columns="attack_label",
                           values="token_accuracy", aggfunc="mean")
    print()
    print("token accuracy per attack:")
    print("| threat | split | setting | " + " | ".join(table.columns) + " |")
    print("| --- " * (3 + len(table.columns)) + "|")
    for key, row in table.iterrows():
        print("| " + " | ".join(map(str, key)) + " | " + " | ".join(_f(v) for v in row) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
