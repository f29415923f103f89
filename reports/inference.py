"""The report's inference section: what the server reads of the prompt and of the answer when the
trained split serves its victims, per split depth, and samples (prompt, answer, what the server read).

Inference rows (``mode = "inference"``) carry ``prompt_<metric>`` / ``response_<metric>`` with intervals and
advantage over the blind baseline. ``split_modes`` keeps them out of the training sections; ``section`` is the
section's flowables; ``verdict_rows`` the page-1 verdict table's rows for inference (same levels as
``reports.verdict``: on the upper end of the advantage's interval). Reads only the store; no torch.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from reportlab.lib.units import cm
from reportlab.platypus import KeepTogether

from reports.markup import escape, sample_markup
from reports.pdf import LANDSCAPE_W, para, table, text
from reports.tables import NO_DEFENSE, num, param_label
from reports.verdict import LITTLE, level

TITLE = "8. Inference: the prompt and the answer"
PARTS = ("prompt", "response")
NUMERIC = tuple(f"{pre}{part}_token_accuracy{end}" for part in PARTS for pre in ("", "adv_")
                for end in ("", "_lo", "_hi")) + ("answer_rougeL", "seconds_per_token", "bytes_per_token")


def split_modes(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, inference rows) of a prepared store; stores written before modes existed are training."""
    if df.empty or "mode" not in df:
        return df, df.iloc[0:0]
    inference = df["mode"] == "inference"
    out = df[inference].copy()
    for col in NUMERIC:
        if col in out:
            out[col] = pd.to_numeric(out[col], errors="coerce")
    return df[~inference], out


def _ci(r: Any, col: str) -> str:
    v, lo, hi = num(r.get(col)), num(r.get(f"{col}_lo")), num(r.get(f"{col}_hi"))
    if v is None:
        return "–"
    return f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def leakage_table(inf: pd.DataFrame) -> pd.DataFrame:
    """One row per split, threat, defense and attack (ok cells): prompt and response token accuracy with
    intervals, their advantage over blind, and the utility at inference."""
    ok = inf[inf["ok"]] if "ok" in inf else inf
    ok = ok[ok["attack"] != "blind"]
    cols = ["split", "head_blocks", "threat_label", "defense_label", "attack_label", *NUMERIC]
    return ok[[c for c in cols if c in ok]].sort_values(["head_blocks", "threat_label", "defense_label",
                                                         "attack_label"], kind="stable")


def _strongest(cells: pd.DataFrame, part: str) -> pd.Series | None:
    col = f"adv_{part}_token_accuracy" if cells[f"adv_{part}_token_accuracy"].notna().any() else f"{part}_token_accuracy"
    cells = cells[cells[col].notna()]
    return None if cells.empty else cells.sort_values(col, ascending=False, kind="stable").iloc[0]


def section(inf: pd.DataFrame, n_samples: int = 3) -> list:
    """The section's flowables (nothing when the store has no inference rows)."""
    if inf.empty:
        return []
    out = [para(escape(TITLE), "h1"), para(
        "The trained split serves each victim's records as prompts; the server receives the prompt's head "
        "output, then one message per generated token, and keeps its KV cache. Token accuracy of the prompt and "
        "of the response (the generated tokens whose activations crossed the wire) with 95 % intervals; adv = "
        "advantage over the blind baseline. Answer ROUGE-L: the deployed answer against the undefended one.",
        "caption")]
    rows = [[text(h, "head") for h in ("Split", "Threat", "Defense", "Attack", "Prompt acc.", "Response acc.",
                                        "Adv. prompt", "Adv. response", "Answer R-L", "ms / B per token")]]
    for _, r in leakage_table(inf).iterrows():
        per_token = "–" if num(r.get("seconds_per_token")) is None else (
            f"{1000 * num(r['seconds_per_token']):.1f} / {num(r.get('bytes_per_token')) or 0:,.0f}")
        rows.append([text(str(r["split"])), text(str(r["threat_label"])), text(str(r["defense_label"])),
                     text(str(r["attack_label"])), text(_ci(r, "prompt_token_accuracy")),
                     text(_ci(r, "response_token_accuracy")), text(_ci(r, "adv_prompt_token_accuracy")),
                     text(_ci(r, "adv_response_token_accuracy")),
                     text("–" if num(r.get("answer_rougeL")) is None else f"{num(r['answer_rougeL']):.0f}"),
                     text(per_token)])
    widths = [1.3 * cm, 2.6 * cm, 2.6 * cm, 3.2 * cm, 3.0 * cm, 3.0 * cm, 3.0 * cm, 3.0 * cm, 1.7 * cm]
    out.append(table(rows, [*widths, LANDSCAPE_W - sum(widths)]))
    undefended = inf[(inf["defense"] == NO_DEFENSE) & inf["ok"] & (inf["attack"] != "blind")]
    if not undefended.empty:
        best = _strongest(undefended[undefended["head_blocks"] == undefended["head_blocks"].max()], "response")
        if best is not None:
            out += _samples(best, n_samples)
    return out


def _samples(row: pd.Series, n: int) -> list:
    samples = row["samples"] if isinstance(row["samples"], list) else []
    if not samples:
        return []
    head = [text(h, "head") for h in ("Prompt (private)", "What the server read", "Answer (generated)",
                                       "What the server read")]
    rows = [head]
    for s in samples[:n]:
        prompt, read = sample_markup(s)
        rows.append([para(prompt, "sample"), para(read, "sample"), para(escape(s.get("answer", "")), "sample"),
                     para(escape(s.get("response_reconstruction", "")), "sample")])
    title = (f"Samples: {row['attack_label']} ({row['threat_label']}) at {row['split']}, no defense")
    return [KeepTogether([para(escape(title), "h2"), table(rows, [LANDSCAPE_W / 4] * 4)])]


def verdict_rows(frame: pd.DataFrame) -> list[dict]:
    """Rows of the page-1 verdict table for inference, one per threat and part (prompt, response):
    ``section`` ("inference: prompt" / "inference: response"), ``threat``, ``level`` of the strongest
    undefended attack (on the upper end of its advantage interval, or of its token accuracy's when no blind
    baseline ran), ``attack``, ``advantage`` (+ ``_lo`` / ``_hi``), and ``cheapest``: the defended setting with
    the best answer ROUGE-L whose every attack at that split stays below 'little', with ``cheapest_cost`` (its
    answer ROUGE-L against the undefended answer), or None when no tested setting gets there."""
    if frame.empty or "mode" not in frame:
        return []
    every = frame[(frame["mode"] == "inference") & (frame["attack"] != "blind")]
    inf = every[every["status"] == "ok"]
    out = []
    for threat in sorted(every["threat"].dropna().unique()):
        cells = inf[inf["threat"] == threat]
        failed = every[(every["threat"] == threat) & (every["status"] != "ok")]
        note = "" if failed.empty else f"{len(failed)} cell(s) failed: {failed.iloc[0].get('error')}"
        for part in PARTS:
            adv = f"adv_{part}_token_accuracy"
            col = (adv if adv in cells and pd.to_numeric(cells[adv], errors="coerce").notna().any()
                   else f"{part}_token_accuracy")
            none = cells[cells["defense"] == NO_DEFENSE]
            ref = none if not none.empty else cells
            hi = _hi(ref, col) if col in ref else pd.Series(dtype=float)
            if hi.isna().all():  # every cell failed, or none was scored: unknown, never dropped
                out.append({"section": f"inference: {part}", "threat": threat, "level": "unknown",
                            "attack": "every cell failed" if cells.empty else "no cell scored", "advantage": None,
                            "advantage_lo": None, "advantage_hi": None, "cheapest": None, "cheapest_cost": None,
                            "note": _short(note or "no leakage could be computed")})
                continue
            worst = ref.loc[hi.idxmax()]
            strongest = str(worst["attack"]) if not none.empty else None
            cheapest, cost = _cheapest(cells, col, strongest)
            row = {"section": f"inference: {part}", "threat": threat, "level": level(num(hi.max())),
                   "attack": worst["attack"], "advantage": num(worst.get(col)),
                   "advantage_lo": num(worst.get(f"{col}_lo")), "advantage_hi": num(worst.get(f"{col}_hi")),
                   "cheapest": cheapest, "cheapest_cost": cost}
            out.append({**row, "note": _short(note)} if note else row)
    return out


def _short(note: str) -> str:
    return note if len(note) <= 80 else note[:79] + "…"


def _end(s: pd.DataFrame, col: str, end: str) -> pd.Series:
    """The ``_lo`` / ``_hi`` end of ``col``'s interval, the point value where a store has none."""
    point = pd.to_numeric(s[col], errors="coerce")
    return pd.to_numeric(s[f"{col}{end}"], errors="coerce").fillna(point) if f"{col}{end}" in s else point


def _hi(s: pd.DataFrame, col: str) -> pd.Series:
    return _end(s, col, "_hi")


def _acted(s: pd.DataFrame, base: pd.DataFrame, col: str) -> bool | None:
    """Whether a defended setting measurably acted: False when a store's ``acted`` says so, or when every
    attack's leakage interval overlaps the undefended one of the same attack at the same split (the leakage
    did not move); None when there is nothing to compare with."""
    if "acted" in s and s["acted"].eq(False).all():
        return False
    lo, hi = _end(s, col, "_lo"), _hi(s, col)
    same = []
    for i, r in s.iterrows():
        b = base[base["attack"] == r["attack"]]
        if b.empty:
            return None
        b_lo = _end(b, col, "_lo").min()
        b_hi = _hi(b, col).max()
        same.append(bool(lo[i] <= b_hi and b_lo <= hi[i]))
    return False if same and all(same) else True


def _cheapest(cells: pd.DataFrame, col: str, strongest: str | None = None) -> tuple[str | None, str | None]:
    """The defended setting (defense, parameters, split) whose strongest attack's upper bound is below
    'little', with the best answer ROUGE-L; only a setting the strongest undefended attack also ran against
    (``strongest``: training's ``_verified`` rule) and that measurably acted."""
    found = []
    for (defense, _params, k), s in cells[cells["defense"] != NO_DEFENSE].groupby(
            ["defense", cells["defense_params"].astype(str), "head_blocks"], dropna=False):
        if strongest is not None and strongest not in set(s["attack"]):
            continue  # checked only by weaker attacks: never sufficient
        base = cells[(cells["defense"] == NO_DEFENSE) & (cells["head_blocks"] == k)]
        if _acted(s, base, col) is False:
            continue
        hi = _hi(s, col)
        if hi.notna().all() and hi.max() < LITTLE:
            quality = pd.to_numeric(s["answer_rougeL"], errors="coerce").min()
            label = f"{param_label(defense, s['defense_params'].iloc[0])} at k={k}"
            found.append((-(quality if pd.notna(quality) else -1.0), label, quality))
    if not found:
        return None, None
    _, label, quality = min(found)
    return label, (f"answer ROUGE-L {quality:.0f} against the undefended answer" if pd.notna(quality)
                   else "unmeasured")
