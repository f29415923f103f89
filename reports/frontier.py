"""Privacy-utility settings from the results store: for every threat, defense setting and split, the strongest
attack's leakage with its interval, the utility cost with its interval, whether the defense measurably acted,
and the Pareto frontier. Pure pandas over ``tables.prepare``'s frame; no attack or defense names except
``NO_DEFENSE`` and the blind baseline's ``BLIND``.

* **Leakage** is the headline metric ``HEADLINE`` (token accuracy) as advantage over the blind attack on the same
  records (``adv_token_accuracy`` with ``_lo/_hi``) where the store has it, else the raw metric (``kind`` says
  which). The strongest attack of a setting is the one whose interval reaches highest (then the highest mean)
  over every attack the threat ran there — activations, gradients, adaptive or not.
* **Utility cost** is the relative increase of held-out perplexity over the undefended cell of the same split
  (``perplexity`` when the store has it, else exp(held-out loss)), with the interval from ``utility_lo/_hi``;
  beside it the increase over the centralised fine-tune (``perplexity_centralised`` / ``utility_centralised``)
  when present.
* A defense setting **acted** when its own trace of the mechanism moved (``dcor_first`` vs ``dcor_last10_mean``
  in its report, where it has one), or its cost interval excludes 0 (the held-out perplexity under the defense,
  with its interval, against the undefended model's at the same split: the same held-out records, so the cost
  is paired), or some threat's leakage interval excludes the undefended leakage. Overlapping loss intervals
  are not "no change": DxP at +54 % [+22 %, +95 %] acted. It **did not act** when none of these holds;
  without intervals (an older store) the changes are compared with the tolerances ``SAME_LEAK``/``SAME_LOSS``.
  A defense's report may say where it was measured to act (``acts_from``: a phrase with its source); the
  sentences that say a setting did not act add it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from reports.tables import NO_DEFENSE, num

HEADLINE = "token_accuracy"
BLIND = "blind"
SAME_LEAK = 0.05  # without intervals: a leakage change below this is no change
SAME_LOSS = 0.01  # without intervals: a held-out loss change below this is no change
TRACE_MOVED = 0.01  # a mechanism trace (first vs last) that moves less than this did not act
TRACES = (("dcor_first", "dcor_last10_mean", "dCor"),)  # (first, last, name) in a defense_report
IDENTITY = ["model", "head_blocks", "tail_blocks", "split", "threat", "threat_label", "attack", "attack_label",
            "defense", "defense_label", "_adaptive"]
OPTIONAL = ("perplexity", "utility_centralised", "perplexity_centralised", "utility_lo", "utility_hi",
            f"{HEADLINE}_lo", f"{HEADLINE}_hi", f"adv_{HEADLINE}", f"adv_{HEADLINE}_lo", f"adv_{HEADLINE}_hi",
            "adaptive")


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(np.nan, index=df.index)


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Finished cells with ``leak``, ``leak_lo``, ``leak_hi``, ``kind`` (advantage | raw) and ``raw``; rows
    that differ only in their seed are pooled (mean, widest interval)."""
    keep = [c for c in df.columns if c not in ("samples", "config", "versions", "error", "note")]
    ok = df.loc[df["ok"], keep].copy()  # the wide JSON columns are not needed and slow every selection down
    for c in OPTIONAL:
        ok[c] = _col(ok, c)
    ok["_adaptive"] = ok["adaptive"].fillna(-1).astype(int)
    adv = ok[f"adv_{HEADLINE}"]
    has_adv = adv.notna()
    ok["kind"] = np.where(has_adv, "advantage", "raw")
    ok["raw"] = ok[HEADLINE]
    ok["leak"] = adv.where(has_adv, ok[HEADLINE])
    ok["leak_lo"] = ok[f"adv_{HEADLINE}_lo"].where(has_adv, ok[f"{HEADLINE}_lo"]).fillna(ok["leak"])
    ok["leak_hi"] = ok[f"adv_{HEADLINE}_hi"].where(has_adv, ok[f"{HEADLINE}_hi"]).fillna(ok["leak"])
    ok = ok.dropna(subset=["leak"])
    if ok.empty or not ok.duplicated(IDENTITY).any():
        return ok
    agg: dict[str, Any] = {c: "first" for c in ok.columns if c not in IDENTITY}
    for c in ("leak", "raw", "utility", "perplexity", "utility_centralised", "perplexity_centralised"):
        agg[c] = "mean"
    for c in ("leak_lo", "utility_lo"):
        agg[c] = "min"
    for c in ("leak_hi", "utility_hi"):
        agg[c] = "max"
    return ok.groupby(IDENTITY, sort=False, dropna=False).agg(agg).reset_index()


def _ppl(rows: pd.DataFrame) -> tuple[float | None, float | None, float | None]:
    """(perplexity, low, high) of a setting's training run."""
    loss = num(rows["utility"].mean())
    ppl = num(rows["perplexity"].mean())
    if ppl is None and loss is not None:
        ppl = math.exp(loss)
    lo, hi = num(rows["utility_lo"].min()), num(rows["utility_hi"].max())
    return ppl, (math.exp(lo) if lo is not None else None), (math.exp(hi) if hi is not None else None)


def _rel(p: float | None, p0: float | None) -> float | None:
    return None if p is None or p0 is None else p / p0 - 1


def _excludes(lo: float | None, hi: float | None, point: float | None) -> bool | None:
    """Whether the interval [lo, hi] leaves out ``point`` (None when there is no interval)."""
    if lo is None or hi is None or point is None or lo == hi:
        return None
    return point < lo or point > hi


def _moved(v, lo, hi, ref, tol: float) -> bool | None:
    """Whether a value moved from ``ref``: its interval excludes ``ref``; without an interval, by more than
    ``tol``; None when either value is missing."""
    if v is None or ref is None:
        return None
    out = _excludes(lo, hi, ref)
    return abs(v - ref) >= tol if out is None else out


def _trace(reports: list[Any]) -> tuple[bool | None, str]:
    """(did the mechanism's own trace move, a phrase such as 'dCor 0.9995 → 0.9989')."""
    for rep in reports:
        if not isinstance(rep, dict):
            continue
        for first, last, name in TRACES:
            a, b = num(rep.get(first)), num(rep.get(last))
            if a is not None and b is not None:
                return abs(a - b) >= TRACE_MOVED, f"{name} {a:.4f} → {b:.4f}"
    return None, ""


def settings(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (threat, defense setting, split) with the strongest attack's leakage and the utility cost."""
    cols = ["model", "threat", "threat_label", "defense", "defense_label", "head_blocks", "split", "attack_label",
            "adaptive", "leak", "leak_lo", "leak_hi", "kind", "raw", "n_attacks", "blind", "loss", "loss_lo",
            "loss_hi", "ppl", "cost", "cost_lo", "cost_hi", "cost_central", "acted", "act_note", "is_none", "attack",
            "attacks", "guarantee", "acts_from"]
    h = headline(df) if not df.empty else pd.DataFrame()
    if h.empty:
        return pd.DataFrame(columns=cols)
    h = h.assign(_rank_hi=h["leak_hi"], _rank=h["leak"])
    out = []
    training = {key: g for key, g in h.groupby(["model", "defense_label", "head_blocks"], sort=False)}
    central = {}
    for model, g in h.groupby("model"):
        ppl_c = num(g["perplexity_centralised"].mean())
        loss_c = num(g["utility_centralised"].mean())
        central[model] = ppl_c if ppl_c is not None else (math.exp(loss_c) if loss_c is not None else None)
    none_label = _none_label(h)
    blinds: dict[tuple, float] = {}
    for (model, k, label, threat), v in h[h["attack"] == BLIND].groupby(
            ["model", "head_blocks", "defense_label", "threat_label"])["raw"]:
        for key in ((model, k, label, threat), (model, k, None, threat), (model, k, None, None)):
            blinds.setdefault(key, float(v.mean()))
    keys = ["model", "threat", "threat_label", "defense", "defense_label", "head_blocks", "split"]
    for key, g in h.groupby(keys, sort=False):
        model, threat, threat_label, defense, label, k, split = key
        best = g.sort_values(["_rank_hi", "_rank"], ascending=False).iloc[0]
        blind = blinds.get((model, k, label, threat_label))
        if blind is None:  # blind sees nothing: the same records under another defense or threat score the same
            blind = blinds.get((model, k, None, threat_label), blinds.get((model, k, None, None)))
        train = training[(model, label, k)]
        ppl, ppl_lo, ppl_hi = _ppl(train)
        none = training.get((model, none_label, k))
        ppl0 = _ppl(none)[0] if none is not None else None
        c = central.get(model)
        out.append({
            "model": model, "threat": threat, "threat_label": threat_label, "defense": defense,
            "defense_label": label, "head_blocks": k, "split": split, "attack_label": best["attack_label"],
            "adaptive": None if best["_adaptive"] < 0 else bool(best["_adaptive"]),
            "leak": best["leak"], "leak_lo": best["leak_lo"], "leak_hi": best["leak_hi"], "kind": best["kind"],
            "raw": best["raw"], "n_attacks": len(g), "blind": blind,
            "loss": num(train["utility"].mean()), "loss_lo": num(train["utility_lo"].min()),
            "loss_hi": num(train["utility_hi"].max()), "ppl": ppl,
            "cost": 0.0 if defense == NO_DEFENSE else _rel(ppl, ppl0),
            "cost_lo": _rel(ppl_lo, ppl0) if defense != NO_DEFENSE else None,
            "cost_hi": _rel(ppl_hi, ppl0) if defense != NO_DEFENSE else None,
            "cost_central": None if c is None or ppl is None else ppl / c - 1,
            "acted": None, "act_note": "", "is_none": defense == NO_DEFENSE,
            "attack": best["attack"], "attacks": tuple(sorted(set(g["attack"]))),
            "guarantee": guarantee(g["defense_report"]),
            "acts_from": next((str(r["acts_from"]) for r in g["defense_report"]
                               if isinstance(r, dict) and r.get("acts_from")), ""),
        })
    s = pd.DataFrame(out, columns=cols)
    return _acted(s, h)


def guarantee(reports: Any) -> str:
    """What a setting's reports say it guarantees: 'ε = 3.1 (δ = 1e-05)' where ``epsilon`` is finite and the
    report's ``guarantee`` says it holds, 'no guarantee: <why>' where it says it does not, else ''."""
    for rep in reports:
        if not isinstance(rep, dict) or "epsilon" not in rep:
            continue
        eps, why = num(rep.get("epsilon")), str(rep.get("guarantee", ""))
        if why.startswith("none"):
            return "no guarantee: " + why.removeprefix("none").lstrip(": ")
        if eps is None or math.isinf(eps):
            return "no guarantee (ε = ∞)"
        delta = num(rep.get("delta"))
        return f"ε = {eps:.3g}" + (f" (δ = {delta:g})" if delta is not None and "δ" in why else "")
    return ""


def _none_label(h: pd.DataFrame) -> str:
    labels = h.loc[h["defense"] == NO_DEFENSE, "defense_label"]
    return labels.iloc[0] if not labels.empty else NO_DEFENSE


def _acted(s: pd.DataFrame, h: pd.DataFrame) -> pd.DataFrame:
    """Fill ``acted`` (False = did not measurably act; None = cannot tell) and ``act_note`` per setting
    (module docstring: the trace, the paired cost interval, the leakage intervals)."""
    base = {(r.model, r.threat_label, r.head_blocks): r for r in s[s["is_none"]].itertuples()}
    reports = {key: list(v) for key, v in h.groupby(["model", "defense_label", "head_blocks"])["defense_report"]}
    for (model, label, k), g in s[~s["is_none"]].groupby(["model", "defense_label", "head_blocks"]):
        moved, trace = _trace(reports.get((model, label, k), []))
        r0 = g.iloc[0]
        cost = _moved(num(r0["cost"]), num(r0["cost_lo"]), num(r0["cost_hi"]), 0.0, math.expm1(SAME_LOSS))
        leaks = []
        for r in g.itertuples():
            b = base.get((model, r.threat_label, k))
            leaks.append(None if b is None else _moved(num(r.leak), num(r.leak_lo), num(r.leak_hi), num(b.leak),
                                                       SAME_LEAK))
        signs = [moved, cost, *leaks]
        if any(x is True for x in signs):
            acted = True
        elif moved is None and (cost is None or not leaks or None in leaks):
            acted = None
        else:
            acted = False
        notes = [trace + (" (unchanged)" if moved is False else "")] if trace else []
        if acted is False:
            measured = g["leak_lo"].ne(g["leak_hi"]).any() or num(r0["cost_lo"]) is not None
            notes.append("its cost interval includes 0 and every leakage interval the undefended leakage"
                         if measured else "utility and leakage equal to no defense (no intervals in this store)")
        elif cost is True and not any(x is True for x in leaks) and moved is not True:
            notes.append("acted on utility only: cost interval excludes 0, leakage unchanged")
        idx = g.index
        s.loc[idx, "acted"] = pd.Series([acted] * len(idx), index=idx, dtype=object)
        s.loc[idx, "act_note"] = "; ".join(notes)
    return s


def pareto(points: pd.DataFrame, x: str = "cost", y: str = "leak") -> pd.Series:
    """True where no other point is at least as good on both axes and strictly better on one (lower is better;
    points without a cost are never on the frontier)."""
    xs, ys = points[x].astype(float).to_numpy(), points[y].astype(float).to_numpy()
    flags = []
    for i in range(len(points)):
        if np.isnan(xs[i]) or np.isnan(ys[i]):
            flags.append(False)
            continue
        dominated = ((xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i])))
        flags.append(not dominated.any())
    return pd.Series(flags, index=points.index)
