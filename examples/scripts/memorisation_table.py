"""BENCHMARKS.md's memorisation table from one or more results stores: one line per (strategy, fine-tuning,
defense, view), with exposure by repeats, canaries extracted, membership AUC and TPR at 1 % / 0.1 % FPR
(with the number of false positives each rests on), and the held-out loss of the trained split.

    python examples/scripts/memorisation_table.py runs/memorisation_smollm2 runs/memorisation_smollm2_serial \\
        runs/memorisation_smollm2_dp
"""

from __future__ import annotations

import argparse
import sys

from reports.memorisation import dp_covers
from reports.tables import num
from suite.experiment.store import load_results


def _dict(value) -> dict:
    """A nested field of a row (the store gives dicts; an absent one is empty)."""
    return value if isinstance(value, dict) else {}


def _interval(value, lo, hi, fmt: str = "{:.3f}", scale: float = 1.0, unit: str = "") -> str:
    value, lo, hi = num(value), num(lo), num(hi)
    if value is None:
        return "–"
    f = lambda x: fmt.format(x * scale)  # noqa: E731
    return f"{f(value)}{unit}" + ("" if lo is None or hi is None else f" [{f(lo)}, {f(hi)}]")


def _setting(row, view: str) -> str:
    """The strategy, and the defense with its ε where it bounds this view (else "no guarantee")."""
    strategy = row["strategy"]
    if row["defense"] in (None, "none"):
        return strategy
    report = _dict(row["defense_report"])
    params = _dict(row["defense_params"])
    eps = report.get("epsilon")
    guarantee = f"ε = {eps:.2f}" if eps is not None and dp_covers(report, view) else "no guarantee"
    shown = ", ".join(f"{k} = {v}" for k, v in sorted(params.items()))  # every parameter: distinct settings stay apart
    return f"{strategy}, `{row['defense']}` {shown} ({guarantee})"


def table(stores: list[str]) -> str:
    lines = ["| setting | finetune | view | held-out loss | exposure by repeats, bits [95 %] | extracted (of N) "
             "| membership AUC [95 %] | TPR @ 1 % FPR (FP) | TPR @ 0.1 % FPR (FP) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cells: dict[tuple, dict] = {}
    for store in stores:
        df = load_results(store)
        df = df[df["status"] == "ok"]
        for _, row in df.iterrows():
            memo = _dict(row.get("memorisation"))
            if not memo:
                continue
            key = (_setting(row, memo.get("view")), row["finetune"], memo.get("view"))
            cell = cells.setdefault(key, {"loss": row["utility"]})
            if row["attack"] in cell:  # the same view measured twice (another store, threat or model)
                print(f"note: {row['attack']} on {key} appears more than once; the row from {store} "
                      f"({row['model']}, {row['threat']}) is shown", file=sys.stderr)
            cell[row["attack"]] = (row, memo)
    for (setting, finetune, view), cell in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        exposure = extracted = auc = tpr1 = tpr01 = "–"
        if "canary_exposure" in cell:
            _, memo = cell["canary_exposure"]
            by = _dict(memo.get("by_repeats"))
            exposure = ", ".join(f"{r}×: {_interval(v['exposure'], v['exposure_lo'], v['exposure_hi'], '{:.2f}')}"
                                 for r, v in sorted(by.items(), key=lambda kv: int(kv[0])))
        if "extraction" in cell:
            row, memo = cell["extraction"]
            n = sum(int(v["canaries"]) for v in _dict(memo.get("by_repeats")).values())
            extracted = f"{round(row['extracted'] * n)} of {n} [{row['extracted_lo']:.2f}, {row['extracted_hi']:.2f}]"
        if "membership" in cell:
            row, memo = cell["membership"]
            fp = _dict(memo.get("false_positives"))
            auc = _interval(row["auc"], row["auc_lo"], row["auc_hi"]) + f" ({memo.get('signal')})"
            tpr1 = _interval(row["tpr_at_1pct_fpr"], row["tpr_at_1pct_fpr_lo"], row["tpr_at_1pct_fpr_hi"],
                             "{:.1f}", 100, " %") + f" ({fp.get('fp_at_1pct_fpr')})"
            tpr01 = _interval(row["tpr_at_0_1pct_fpr"], row["tpr_at_0_1pct_fpr_lo"], row["tpr_at_0_1pct_fpr_hi"],
                              "{:.1f}", 100, " %") + f" ({fp.get('fp_at_0_1pct_fpr')})"
        lines.append(f"| {setting} | {finetune} | {view} | {cell['loss']:.3f} | {exposure} | {extracted} | {auc} "
                     f"| {tpr1} | {tpr01} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+", help="results directories of memorisation runs")
    print(table(p.parse_args().stores))


if __name__ == "__main__":
    main()
