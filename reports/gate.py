"""The CI regression gate on privacy metrics.

``make_baseline`` records every ok cell's leakage metrics (and their advantage over the blind baseline where the
store has it), each with a band and the direction it is checked in; ``check`` compares a new run:

* under a defense, leakage that *rises* above its band is a privacy regression (direction ``up``);
* without a defense, an attack whose strength *falls* below its band is a regression of the suite (``down``: a
  weaker attacker is not a privacy win, it would make every defense look better than it is);
* a metric at its floor or ceiling is checked in the direction it can move: an undefended attack at 0 is
  checked ``up`` (it moved off its floor: the baseline no longer describes the suite), a defended cell at full
  leakage ``down`` (an attack that stopped recovering what a defense cannot hide is a weaker suite);
* a baseline cell that is missing from the run or failed in it is a regression too.

Memorisation rows are gated the same way on ``exposure`` (bits), ``auc``, ``tpr_at_1pct_fpr``,
``tpr_at_0_1pct_fpr`` and ``extracted`` (each higher = more memorised; no advantage columns). Exposure's ceiling
is the secret space's size in bits, which the row states (``memorisation.space_bits``) and the band keeps
(``ceiling``).

Bands come from the 95 % confidence intervals (``<metric>_lo/_hi``) where the store has them, widened to at least
``MIN_BAND`` either side (floating-point drift between machines); otherwise the value ± ``DEFAULT_TOLERANCE``.
A band that can never trip (``up`` with its upper edge at the ceiling, ``down`` with its lower edge at the
floor) is never written by ``make_baseline`` and makes ``check`` refuse the baseline.

Cells are matched by what they are (``suite.experiment.store.cell_label``: model, split, threat, attack and
defense with parameters, the training axes the cell sweeps, and a " [non-adaptive]" mark where the attack did not
simulate the defense), not by the cell key, so a baseline survives changes that do not change what a cell
measures.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import SplitleakError
from suite.experiment.store import MEMORISATION_METRICS, METRICS, cell_label, open_store

# Absolute bands: BLEU/ROUGE are on 0-100, rates on 0-1, exposure in bits.
DEFAULT_TOLERANCE = {"bleu4": 5.0, "rouge1": 5.0, "rouge2": 5.0, "rougeL": 5.0, "token_accuracy": 0.05,
                     "exact_match": 0.05, "pii_recovery": 0.05,
                     "exposure": 2.0, "auc": 0.05, "tpr_at_1pct_fpr": 0.05, "tpr_at_0_1pct_fpr": 0.05,
                     "extracted": 0.05}
MIN_BAND = {m: t / 2.5 for m, t in DEFAULT_TOLERANCE.items()}  # 2 points on 0-100, 0.02 on rates, 0.8 bits
CEILING = {m: 100.0 if t > 1 else 1.0 for m, t in DEFAULT_TOLERANCE.items()}
CEILING["exposure"] = math.inf  # unless the row states its secret space (the band's ``ceiling``)
FORMAT = 2
UP, DOWN = "up", "down"
WHAT = {UP: "leakage must not rise", DOWN: "attack must not weaken"}


def _base(metric: str) -> str:
    return metric[4:] if metric.startswith("adv_") else metric


def metric_range(metric: str, band: dict[str, Any] | None = None) -> tuple[float, float]:
    """(floor, ceiling) a metric can take (the band's own ``ceiling`` where it has one: exposure's secret
    space); an advantage over blind can be negative."""
    top = band["ceiling"] if band is not None and "ceiling" in band else CEILING[_base(metric)]
    return (-top if metric.startswith("adv_") else 0.0), top


GATED = (*METRICS, *(f"adv_{m}" for m in METRICS), *MEMORISATION_METRICS)


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def can_trip(metric: str, band: dict[str, Any]) -> bool:
    """Whether any value the metric can take lies outside ``band`` in the band's direction."""
    floor, top = metric_range(metric, band)
    if band["check"] == UP:
        return band["hi"] < top
    return band["lo"] > floor


def make_band(metric: str, value: float, lo: float | None, hi: float | None, defended: bool,
              ceiling: float | None = None) -> dict[str, Any]:
    """The band and direction for one metric of one cell; never one that cannot trip. ``ceiling``: the
    metric's own ceiling in this cell (exposure: the secret space's bits), kept in the band."""
    own = {} if ceiling is None else {"ceiling": float(ceiling)}
    floor, top = metric_range(metric, own)
    base, tol = _base(metric), DEFAULT_TOLERANCE[_base(metric)]
    if lo is not None and hi is not None:
        band = {"lo": min(lo, value - MIN_BAND[base]), "hi": max(hi, value + MIN_BAND[base]), "source": "interval"}
    else:
        band = {"lo": value - tol, "hi": value + tol, "source": "tolerance"}
    preferred, other = (UP, DOWN) if defended else (DOWN, UP)
    for lo_hi in (band, {**band, "lo": value - MIN_BAND[base], "hi": value + MIN_BAND[base], "source": "narrowed"}):
        for direction in (preferred, other):
            candidate = {"value": value, "lo": lo_hi["lo"], "hi": lo_hi["hi"], "check": direction,
                         "source": lo_hi["source"], **own}
            if can_trip(metric, candidate):
                if direction != preferred:
                    candidate["reason"] = "at its floor" if direction == UP else "at its ceiling"
                return candidate
    raise AssertionError(f"no band can trip for {metric}={value} in [{floor}, {top}]")  # MIN_BAND < range / 2


def make_baseline(directory: str | Path) -> dict[str, Any]:
    with open_store(directory, must_exist=True) as store:
        rows = store.rows()
    cells = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        defended = r["defense"] != "none"
        metrics = {}
        for m in GATED:
            v = _num(r.get(m))
            if v is not None:
                metrics[m] = make_band(m, v, _num(r.get(f"{m}_lo")), _num(r.get(f"{m}_hi")), defended,
                                       _space_bits(r) if m == "exposure" else None)
        cells[cell_label(r)] = {"defended": defended, "metrics": metrics}
    if not cells:
        raise SplitleakError(f"no finished cells in {directory}: nothing to make a baseline from")
    return {"format": FORMAT, "cells": cells}


def _space_bits(row: dict[str, Any]) -> float | None:
    """The secret space (bits) a memorisation row's exposure is capped at, where the row says."""
    detail = row.get("memorisation")
    try:
        detail = json.loads(detail) if isinstance(detail, str) else detail
    except ValueError:
        return None
    return _num(detail.get("space_bits")) if isinstance(detail, dict) else None


def _legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 baseline (value per metric, one tolerance per metric, direction by 'defended') as bands."""
    tol = {**DEFAULT_TOLERANCE, **data.get("tolerance", {})}
    cells = {}
    for label, cell in data["cells"].items():
        direction = UP if cell["defended"] else DOWN
        cells[label] = {"defended": cell["defended"], "metrics": {
            m: {"value": v, "lo": v - tol[_base(m)], "hi": v + tol[_base(m)], "check": direction,
                "source": "tolerance (format 1)"} for m, v in cell["metrics"].items()}}
    return {"format": FORMAT, "cells": cells}


def load_baseline(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SplitleakError(f"baseline file {p} not found; make one with 'splitleak baseline DIR > {p}'") from None
    except (OSError, ValueError) as err:
        raise SplitleakError(f"baseline file {p} is not readable JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") not in (1, FORMAT) or not isinstance(data.get("cells"), dict):
        raise SplitleakError(f"baseline file {p} is not a splitleak baseline (format 1 or {FORMAT})")
    try:
        data = _legacy(data) if data["format"] == 1 else data
        for label, cell in data["cells"].items():
            for m, band in cell["metrics"].items():
                if m not in GATED or band["check"] not in (UP, DOWN):
                    raise KeyError(f"{label}: {m}")
                band["value"], band["lo"], band["hi"] = float(band["value"]), float(band["lo"]), float(band["hi"])
                if "ceiling" in band:
                    band["ceiling"] = float(band["ceiling"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SplitleakError(f"baseline file {p} has a malformed cell ({err}); regenerate it with "
                             f"'splitleak baseline DIR > {p}'") from None
    return data


def never_trip(baseline: dict[str, Any]) -> list[str]:
    """Bands in ``baseline`` that no value of their metric can trip, one line each."""
    out = []
    for label, cell in sorted(baseline["cells"].items()):
        for m, band in sorted(cell["metrics"].items()):
            if not can_trip(m, band):
                floor, top = metric_range(m, band)
                edge = f"upper edge {band['hi']:.4g} >= ceiling {top:g}" if band["check"] == UP else \
                    f"lower edge {band['lo']:.4g} <= floor {floor:g}"
                out.append(f"{label}: {m} = {band['value']:.4g} checked {band['check']} can never trip ({edge})")
    return out


@dataclass
class Case:
    """One (cell, metric) comparison: a JUnit test case, a row of the markdown table."""

    cell: str
    metric: str
    check: str  # up | down | "" when the cell could not be compared at all
    old: float | None
    lo: float | None
    hi: float | None
    new: float | None = None
    problem: str | None = None  # None: passed


@dataclass
class CheckResult:
    cases: list[Case] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{c.cell}: {c.problem}" for c in self.cases if c.problem]

    def counts(self) -> dict[str, tuple[int, int]]:
        """direction -> (cells, metrics) checked in that direction."""
        out = {}
        for d in (UP, DOWN):
            mine = [c for c in self.cases if c.check == d]
            out[d] = (len({c.cell for c in mine}), len(mine))
        return out

    def summary(self) -> str:
        cells = len({c.cell for c in self.cases})
        parts = [f"{d} ({WHAT[d]}): {n_cells} cells, {n} metrics" for d, (n_cells, n) in self.counts().items()]
        bad = len(self.problems)
        return (f"check: {cells} baseline cells, {len(self.cases)} metrics; " + "; ".join(parts)
                + f"; {bad} regressions" + (" -> FAIL" if bad else " -> ok"))


def check(directory: str | Path, baseline: dict[str, Any]) -> CheckResult:
    """Compare the run in ``directory`` with ``baseline``; refuses a baseline with a band that cannot trip."""
    bad = never_trip(baseline)
    if bad:
        raise SplitleakError(f"the baseline has {len(bad)} bands that can never trip (first: {bad[0]}); "
                             "regenerate it with 'splitleak baseline DIR'")
    with open_store(directory, must_exist=True) as store:
        rows = {cell_label(r): r for r in store.rows()}
    result = CheckResult()
    for label, base in sorted(baseline["cells"].items()):
        row = rows.get(label)
        for metric, band in sorted(base["metrics"].items()):
            case = Case(label, metric, band["check"], band["value"], band["lo"], band["hi"])
            result.cases.append(case)
            if row is None:
                case.problem = f"{metric}: missing from the run"
                continue
            if row["status"] != "ok":
                case.problem = f"{metric}: cell failed: {row['error']}"
                continue
            case.new = _num(row.get(metric))
            old, new = band["value"], case.new
            if new is None:
                case.problem = f"{metric} missing (baseline {old:.4g})"
            elif band["check"] == UP and new > band["hi"]:
                what = "leakage under defense rose" if base["defended"] else "rose off its floor"
                case.problem = f"{what}: {metric} {old:.4g} -> {new:.4g} (band up to {band['hi']:.4g})"
            elif band["check"] == DOWN and new < band["lo"]:
                what = "fell from its ceiling" if base["defended"] else "attack got weaker without defense"
                case.problem = f"{what}: {metric} {old:.4g} -> {new:.4g} (band down to {band['lo']:.4g})"
    return result


def junit(result: CheckResult) -> bytes:
    """JUnit XML: one test case per cell and metric (class = cell, name = metric), a failure per regression."""
    suite = ET.Element("testsuite", name="splitleak.check", tests=str(len(result.cases)),
                       failures=str(len(result.problems)), errors="0", skipped="0")
    for c in result.cases:
        tc = ET.SubElement(suite, "testcase", classname=c.cell, name=f"{c.metric} ({c.check})")
        if c.problem:
            failure = ET.SubElement(tc, "failure", message=c.problem, type="regression")
            failure.text = f"{c.cell}: {c.problem}"
    root = ET.Element("testsuites", name="splitleak", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def markdown(result: CheckResult) -> str:
    """A pull-request comment: the summary, a table of regressions, and every comparison folded below it."""
    head = "| Cell | Metric | Check | Baseline | Band | Now | Result |\n|---|---|---|---|---|---|---|\n"

    def row(c: Case) -> str:
        band = "–" if c.lo is None else f"{_g(c.lo)} – {_g(c.hi)}"
        res = f"❌ {_md(c.problem)}" if c.problem else "✅"
        return f"| {_md(c.cell)} | {c.metric} | {c.check} | {_g(c.old)} | {band} | {_g(c.new)} | {res} |\n"

    failed = [c for c in result.cases if c.problem]
    out = [f"### splitleak check: {'FAIL' if failed else 'ok'}\n\n", f"{_md(result.summary())}\n\n"]
    if failed:
        out += ["**Regressions**\n\n", head, *map(row, failed), "\n"]
    out += [f"<details><summary>All {len(result.cases)} comparisons</summary>\n\n", head,
            *map(row, result.cases), "\n</details>\n"]
    return "".join(out)
