"""The CI regression gate on privacy metrics.

``baseline`` records every ok cell's leakage metrics with a tolerance band; ``check`` compares a new run:

* under a defense, leakage that *rises* beyond its band is a privacy regression;
* without a defense, an attack whose strength *falls* beyond its band is a regression of the suite (a weaker
  attacker is not a privacy win: it would make every defense look better than it is);
* a baseline cell that is missing from the run or failed in it is a regression too.

Cells are matched by what they are (model, split, threat, attack and defense with parameters), not by the
cell key, so a baseline survives changes that do not change what a cell measures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from suite.errors import SplitleakError
from suite.store import METRICS, open_store

# Absolute bands: BLEU/ROUGE are on 0-100, rates on 0-1.
DEFAULT_TOLERANCE = {"bleu4": 5.0, "rouge1": 5.0, "rouge2": 5.0, "rougeL": 5.0, "token_accuracy": 0.05,
                     "exact_match": 0.05, "pii_recovery": 0.05}
FORMAT = 1


def cell_label(row: dict[str, Any]) -> str:
    def params(p) -> str:
        p = json.loads(p) if isinstance(p, str) else (p or {})
        return "" if not p else json.dumps(p, sort_keys=True, separators=(",", ":"))

    return (f"{row['model']} k={row['head_blocks']} m={row['tail_blocks']} {row['threat']}/"
            f"{row['attack']}{params(row['attack_params'])}/{row['defense']}{params(row['defense_params'])}")


def make_baseline(directory: str | Path, tolerance: dict[str, float] | None = None) -> dict[str, Any]:
    with open_store(directory, must_exist=True) as store:
        rows = store.rows()
    cells = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        cells[cell_label(r)] = {
            "defended": r["defense"] != "none",
            "metrics": {m: r[m] for m in METRICS if r[m] is not None},
        }
    if not cells:
        raise SplitleakError(f"no finished cells in {directory}: nothing to make a baseline from")
    return {"format": FORMAT, "tolerance": {**DEFAULT_TOLERANCE, **(tolerance or {})}, "cells": cells}


def load_baseline(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SplitleakError(f"baseline file {p} not found; make one with 'splitleak baseline DIR > {p}'") from None
    except (OSError, ValueError) as err:
        raise SplitleakError(f"baseline file {p} is not readable JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("cells"), dict):
        raise SplitleakError(f"baseline file {p} is not a splitleak baseline (format {FORMAT})")
    return data


def check(directory: str | Path, baseline: dict[str, Any]) -> list[str]:
    """Regressions of the run in ``directory`` against ``baseline``, one line each (empty = pass)."""
    with open_store(directory, must_exist=True) as store:
        rows = {cell_label(r): r for r in store.rows()}
    tol = {**DEFAULT_TOLERANCE, **baseline.get("tolerance", {})}
    problems = []
    for label, base in sorted(baseline["cells"].items()):
        row = rows.get(label)
        if row is None:
            problems.append(f"{label}: missing from the run")
            continue
        if row["status"] != "ok":
            problems.append(f"{label}: cell failed: {row['error']}")
            continue
        for metric, old in base["metrics"].items():
            new = row.get(metric)
            if new is None:
                problems.append(f"{label}: {metric} missing (baseline {old:.4g})")
            elif base["defended"] and new > old + tol[metric]:
                problems.append(f"{label}: leakage under defense rose: {metric} {old:.4g} -> {new:.4g} "
                                f"(band +{tol[metric]:g})")
            elif not base["defended"] and new < old - tol[metric]:
                problems.append(f"{label}: attack got weaker without defense: {metric} {old:.4g} -> {new:.4g} "
                                f"(band -{tol[metric]:g})")
    return problems
