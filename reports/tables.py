"""The results store reshaped for the report: labels, the strongest attack per threat and defense, the matrix,
attack costs, and the run's config. Pure pandas; reads only what ``suite.experiment.store.load_results`` returns.

"Strongest" means the highest token accuracy (ties broken by BLEU-4, then ROUGE-1) among finished cells.
Nothing here knows attack or defense names except ``NO_DEFENSE``, the store's name for "no defense".
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from suite.experiment.store import ADVANTAGE_COLUMNS, INTERVAL_COLUMNS, METRICS

NO_DEFENSE = "none"
STRENGTH = ("token_accuracy", "bleu4", "rouge1")  # what "strongest attack" sorts by, in order


def num(value: Any) -> float | None:
    """A float, or None for missing values (None, NaN, non-numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _params(p: Any) -> dict[str, Any]:
    if isinstance(p, str):
        try:
            p = json.loads(p)
        except ValueError:
            return {"": p}
    return p if isinstance(p, dict) else {}


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _axis_value(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def param_label(name: Any, params: Any) -> str:
    """``dp_gaussian (clip=1, sigma=0.5)``; just the name without parameters. The space lets table cells
    wrap before the parameters."""
    p = _params(params)
    name = "?" if name is None or (isinstance(name, float) and math.isnan(name)) else str(name)
    return name if not p else f"{name} ({', '.join(f'{k}={_value(v)}' for k, v in sorted(p.items()))})"


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """The store with derived columns: ``defense_label``, ``attack_label``, ``split`` (k or k/m), ``ok``."""
    df = df.copy()
    for col in (*METRICS, "utility", "attack_seconds", "attack_peak_rss_mib", *INTERVAL_COLUMNS, *ADVANTAGE_COLUMNS,
                "adaptive", "perplexity", "utility_centralised", "perplexity_centralised"):
        if col in df:  # columns other work adds to the store are read when present
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["defense_label"] = [param_label(n, p) for n, p in zip(df["defense"], df["defense_params"], strict=True)]
    # A swept training axis is part of the setting, never averaged over: steps and finetune have columns of
    # their own; any other axis a cell sweeps is in its ``axes`` (seeds are pooled, not a setting).
    axes = [a if isinstance(a, dict) else {} for a in df["axes"]] if "axes" in df else [{}] * len(df)
    others = sorted({k for a in axes for k in a} - {"steps", "finetune", "seed"})
    for axis in ("steps", "finetune", *others):
        values = df[axis] if axis in df else pd.Series([a.get(axis) for a in axes], index=df.index, dtype=object)
        if values.nunique(dropna=True) > 1:
            df["defense_label"] = [label if pd.isna(v) else f"{label} [{axis}={_axis_value(v)}]"
                                   for label, v in zip(df["defense_label"], values, strict=True)]
    df["attack_label"] = [param_label(n, p) for n, p in zip(df["attack"], df["attack_params"], strict=True)]
    df["ok"] = df["status"] == "ok"
    df["head_blocks"] = pd.to_numeric(df["head_blocks"], errors="coerce").fillna(-1).astype(int)
    tails = pd.to_numeric(df["tail_blocks"], errors="coerce")
    show_tail = tails.nunique(dropna=True) > 1
    df["split"] = [f"k={k}" + (f", m={int(m)}" if show_tail and not math.isnan(m) else "")
                   for k, m in zip(df["head_blocks"], tails, strict=True)]
    if df["model"].nunique(dropna=True) > 1:  # one store, several models: keep them apart everywhere
        df["threat_label"] = df["model"].astype(str) + ": " + df["threat"].astype(str)
    else:
        df["threat_label"] = df["threat"].astype(str)
    return df


def defense_order(df: pd.DataFrame) -> list[str]:
    """Defense labels: no defense first, then by name and parameters."""
    labels = df[["defense", "defense_label"]].drop_duplicates()
    labels = labels.assign(first=labels["defense"] != NO_DEFENSE).sort_values(["first", "defense_label"])
    return list(dict.fromkeys(labels["defense_label"]))


def threat_order(df: pd.DataFrame, known: list[str]) -> list[str]:
    """Threat labels in the order of ``known`` (the presets), unknown ones after."""
    rank = {t: i for i, t in enumerate(known)}
    pairs = df[["threat", "threat_label"]].drop_duplicates()
    pairs = pairs.assign(r=[rank.get(t, len(rank)) for t in pairs["threat"]]).sort_values(["r", "threat_label"])
    return list(dict.fromkeys(pairs["threat_label"]))


def strongest(cells: pd.DataFrame) -> pd.Series | None:
    """The finished cell with the most leakage, or None when none finished."""
    ok = cells[cells["ok"]]
    if ok.empty:
        return None
    return ok.sort_values(list(STRENGTH), ascending=False, na_position="last").iloc[0]


def matrix_rows(df: pd.DataFrame, threats: list[str]) -> pd.DataFrame:
    """Every cell, sorted split → threat → attack → defense."""
    rank = {t: i for i, t in enumerate(threats)}
    dorder = {d: i for i, d in enumerate(defense_order(df))}
    return (df.assign(_t=[rank.get(t, len(rank)) for t in df["threat_label"]],
                      _d=[dorder[d] for d in df["defense_label"]])
              .sort_values(["model", "head_blocks", "tail_blocks", "_t", "attack_label", "_d"])
              .drop(columns=["_t", "_d"]))


def cost_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per attack and split: cells, mean and max seconds, max peak RSS (finished cells only)."""
    ok = df[df["ok"]]
    if ok.empty:
        return pd.DataFrame(columns=["attack_label", "split", "cells", "mean_s", "max_s", "rss"])
    g = ok.sort_values("head_blocks").groupby(["attack_label", "head_blocks", "split"], sort=True)
    return g.agg(cells=("key", "size"), mean_s=("attack_seconds", "mean"), max_s=("attack_seconds", "max"),
                 rss=("attack_peak_rss_mib", "max")).reset_index()


def adaptive_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Cells run both with an adaptive and a non-adaptive attacker (same split, threat, attack, defense): the
    token accuracy and its advantage over blind for each, one row per pair."""
    cols = ["split", "head_blocks", "threat_label", "attack", "defense_label", "acc_0", "acc_1", "adv_0", "adv_1"]
    ok = df[df["ok"]] if "adaptive" in df else df.iloc[0:0]
    ok = ok[ok["adaptive"].notna()] if not ok.empty else ok
    if ok.empty:
        return pd.DataFrame(columns=cols)
    adv = ok["adv_token_accuracy"] if "adv_token_accuracy" in ok else pd.Series(float("nan"), index=ok.index)
    plain = [param_label(n, {k: v for k, v in _params(p).items() if k != "adaptive"})
             for n, p in zip(ok["attack"], ok["attack_params"], strict=True)]
    ok = ok.assign(_mode=ok["adaptive"].astype(int), _adv=adv, _attack=plain)
    keys = ["model", "head_blocks", "split", "threat_label", "_attack", "defense_label"]
    out = []
    for key, g in ok.groupby(keys, sort=True):
        if set(g["_mode"]) >= {0, 1}:
            a, b = g[g["_mode"] == 0].iloc[0], g[g["_mode"] == 1].iloc[0]
            out.append({"split": key[2], "head_blocks": key[1], "threat_label": key[3], "attack": key[4],
                        "defense_label": key[5], "acc_0": a["token_accuracy"], "acc_1": b["token_accuracy"],
                        "adv_0": a["_adv"], "adv_1": b["_adv"]})
    return pd.DataFrame(out, columns=cols)


DEPTH_METRICS = (("bleu4", "BLEU-4", 100.0), ("rougeL", "ROUGE-L", 100.0), ("token_accuracy", "token accuracy", 1.0))


def leakage_by_split(df: pd.DataFrame) -> pd.DataFrame:
    """Undefended finished cells: per (attack, split), the cell of the threat where the attack recovers most
    (token accuracy, then BLEU-4), with BLEU-4, ROUGE-L and token accuracy and their 95 % intervals (``_lo`` /
    ``_hi``, the mean where the store has none). The blind baseline is an attack like the others here."""
    cols = ["attack", "attack_label", "threat_label", "head_blocks", "split"]
    metrics = [m for m, _, _ in DEPTH_METRICS]
    ok = df[df["ok"] & (df["defense"] == NO_DEFENSE)]
    if ok.empty:
        return pd.DataFrame(columns=cols + [f"{m}{e}" for m in metrics for e in ("", "_lo", "_hi")])
    ok = ok.copy()
    for m in metrics:
        ok[m] = pd.to_numeric(ok[m], errors="coerce") if m in ok else float("nan")
        for e in ("_lo", "_hi"):
            ok[m + e] = (pd.to_numeric(ok[m + e], errors="coerce") if m + e in ok else ok[m]).fillna(ok[m])
    best = (ok.sort_values(["token_accuracy", "bleu4"], ascending=False, na_position="last")
              .drop_duplicates(["attack_label", "head_blocks"]).sort_values(["attack_label", "head_blocks"]))
    return best[cols + [f"{m}{e}" for m in metrics for e in ("", "_lo", "_hi")]].reset_index(drop=True)


def defense_reports(df: pd.DataFrame) -> list[tuple[str, dict[str, Any]]]:
    """What each defense configuration measured or guarantees (from its latest finished cell)."""
    out = []
    for label in defense_order(df):
        rows = df[(df["defense_label"] == label) & df["ok"]].sort_values("finished_at")
        rep = next((r for r in reversed(rows["defense_report"].tolist()) if isinstance(r, dict) and r), None)
        out.append((label, rep or {}))
    return out


def run_info(df: pd.DataFrame) -> dict[str, Any]:
    """The latest row's config and versions, and how many distinct ones the store holds."""
    latest = df.sort_values("finished_at", na_position="first")

    def pick(col: str) -> tuple[dict[str, Any], int]:
        vals = [v for v in latest[col].tolist() if isinstance(v, dict)]
        distinct = {json.dumps(v, sort_keys=True, default=str) for v in vals}
        return (vals[-1] if vals else {}), len(distinct)

    config, n_configs = pick("config")
    versions, n_versions = pick("versions")
    return {
        "models": sorted({f"{m} (revision {r})" for m, r in zip(df["model"], df["revision"], strict=True)}),
        "config": config, "n_configs": n_configs, "versions": versions, "n_versions": n_versions,
        "cells": len(df), "ok": int(df["ok"].sum()), "failed": int((~df["ok"]).sum()),
    }
