"""The pipeline section of the report: printed when the store has rows with ``stages`` > 1.

* leakage by stage position: every inversion attack of a curious stage (or two colluding stages, or the
  whole server) by the first block whose input it sees, as a server at that split would;
* tamper impact: every ``tampering`` cell's held-out perplexity beside the same run's clean perplexity
  (a passive cell of the same split, stages and defense);
* detection: what ``transition_audit`` reported (audited, flagged, extra compute, standby replacements);
* the verdict in the same words as today's (``reports.verdict.threat_verdict``) for every stage threat.

``verdict_rows(frame)`` gives the page-1 verdict table its rows for this section. Reads only the store's
frame (no torch).
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from reportlab.lib.units import cm

from reports import tables
from reports.frontier import settings as frontier_settings
from reports.markup import escape
from reports.pdf import PORTRAIT_W, para, table, text
from reports.tables import num
from reports.verdict import _verified, cheapest, level, threat_verdict

SECTION = "pipeline"
TITLE = "Pipeline stages"
INTEGRITY = ("tampering",)


def _stages(df: pd.DataFrame) -> pd.Series:
    if "stages" not in df:
        return pd.Series(1, index=df.index)
    return pd.to_numeric(df["stages"], errors="coerce").fillna(1).astype(int)


def has_pipeline(df: pd.DataFrame) -> bool:
    """Whether the store has rows trained with more than one stage."""
    return not df.empty and bool((_stages(df) > 1).any())


def pipeline_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of runs with S > 1, prepared (``reports.tables.prepare``) if they were not."""
    if not df.empty and "threat_label" not in df:
        df = tables.prepare(df)
    return df[_stages(df) > 1] if not df.empty else df


def position_table(df: pd.DataFrame) -> pd.DataFrame:
    """Inversion leakage by the position of the observing stage: one row per (threat, attack, defense,
    stages), ordered by the first block seen. ``leak`` is the advantage over blind where measured."""
    rows = pipeline_rows(df)
    if rows.empty:
        return pd.DataFrame()
    rows = rows[rows["ok"] & ~rows["attack"].isin((*INTEGRITY, "blind"))].copy()
    if rows.empty:
        return pd.DataFrame()
    adv = pd.to_numeric(rows.get("adv_token_accuracy"), errors="coerce") if "adv_token_accuracy" in rows else None
    raw = pd.to_numeric(rows["token_accuracy"], errors="coerce")
    rows["leak"] = adv.where(adv.notna(), raw) if adv is not None else raw
    for end in ("lo", "hi"):
        a = pd.to_numeric(rows.get(f"adv_token_accuracy_{end}"), errors="coerce") if adv is not None else None
        r = pd.to_numeric(rows.get(f"token_accuracy_{end}"), errors="coerce")
        rows[f"leak_{end}"] = a.where(a.notna(), r) if a is not None else r
    block = pd.to_numeric(rows.get("stage_block"), errors="coerce") if "stage_block" in rows else None
    rows["first_block"] = block.where(block.notna(), rows["head_blocks"]) if block is not None else rows["head_blocks"]
    keep = ["threat_label", "stage", "first_block", "attack_label", "defense_label", "leak", "leak_lo", "leak_hi"]
    return rows.assign(stages=_stages(rows))[["stages", *keep]].sort_values(
        ["stages", "first_block", "threat_label", "attack_label", "defense_label"])


def tamper_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every tampering cell's perplexity beside the clean perplexity of a passive cell of the same split,
    stages and defense (the same training without the malicious stage)."""
    rows = pipeline_rows(df)
    if rows.empty:
        return pd.DataFrame()
    ok = rows[rows["ok"]]
    bad = ok[ok["attack"].isin(INTEGRITY)]
    clean = ok[~ok["attack"].isin(INTEGRITY)]
    out = []
    for _, r in bad.iterrows():
        same = clean[(clean["head_blocks"] == r["head_blocks"]) & (_stages(clean) == int(r["stages"]))
                     & (clean["defense_label"] == r["defense_label"])]
        out.append({"threat": r["threat_label"], "attack": r["attack_label"], "defense": r["defense_label"],
                    "stages": int(r["stages"]), "perplexity": num(r["perplexity"]),
                    "clean_perplexity": num(pd.to_numeric(same["perplexity"], errors="coerce").mean())
                    if not same.empty else None})
    return pd.DataFrame(out)


def _report(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            loaded = json.loads(value)
        except ValueError:
            return {}
        return loaded if isinstance(loaded, dict) else {}
    return {}


def detection_table(df: pd.DataFrame) -> pd.DataFrame:
    """What every transition audit reported, per cell (S = 1 rows included: the audit covers the server)."""
    if df.empty or "defense" not in df:
        return pd.DataFrame()
    if "threat_label" not in df:
        df = tables.prepare(df)
    rows = df[df["ok"] & (df["defense"] == "transition_audit")]
    out = []
    for _, r in rows.iterrows():
        rep = _report(r.get("defense_report"))
        out.append({"threat": r["threat_label"], "attack": r["attack_label"], "defense": r["defense_label"],
                    "stages": int(_stages(rows).loc[r.name]), "audited": rep.get("audited"),
                    "transitions": rep.get("transitions"), "flagged": rep.get("flagged"),
                    "extra_compute": num(rep.get("extra_compute")),
                    "replacements": len(rep.get("replacements") or []),
                    "steps_lost": sum(x.get("steps_lost", 0) for x in rep.get("replacements") or []),
                    # an audit that checked nothing has not passed anything: the report says so
                    "warning": rep.get("warning")})
    return pd.DataFrame(out)


def verdict_rows(frame: pd.DataFrame) -> list[dict]:
    """The page-1 verdict table's rows for the pipeline section: one per threat of the S > 1 runs, with
    ``section``, ``threat``, ``level`` (the undefended level at the worst split, as ``threat_verdict``
    sets it), ``attack`` (its strongest attack there), ``advantage`` with ``advantage_lo`` / ``advantage_hi``
    (token accuracy's advantage over blind, or raw token accuracy where the store has no blind baseline),
    ``cheapest`` (the cheapest tested setting that reaches little or none, or None) and ``cheapest_cost``
    (its held-out perplexity increase)."""
    rows = pipeline_rows(frame)
    if rows.empty:
        return []
    s = frontier_settings(rows)
    out = []
    judged = rows[~rows["attack"].isin((*INTEGRITY, "blind"))]  # tampering is judged by the audit's table
    for threat in sorted(judged["threat_label"].dropna().unique()):
        g = s[s["threat_label"] == threat] if not s.empty else s
        if g.empty:  # every cell of the threat failed (or none was scored): unknown, never dropped
            failed = judged[(judged["threat_label"] == threat) & ~judged["ok"].astype(bool)]
            err = str(failed.iloc[0]["error"]) if not failed.empty else "no finished cell"
            out.append({"section": SECTION, "threat": threat, "level": "unknown", "attack": "every cell failed",
                        "advantage": None, "advantage_lo": None, "advantage_hi": None, "cheapest": None,
                        "cheapest_cost": None, "note": err if len(err) <= 80 else err[:79] + "…"})
            continue
        lvl, _ = threat_verdict(g)
        none = g[g["is_none"]]
        ref = none if not none.empty else g
        worst = ref.sort_values(["leak_hi", "leak"], ascending=False).iloc[0]
        # training's rule: a setting is sufficient only if the strongest undefended attack also ran there
        # (``cheapest`` already requires that the defense acted)
        best = cheapest(_verified(g, str(worst["attack"]) if not none.empty else None))
        out.append({"section": SECTION, "threat": threat, "level": lvl, "attack": worst["attack_label"],
                    "advantage": num(worst["leak"]), "advantage_lo": num(worst["leak_lo"]),
                    "advantage_hi": num(worst["leak_hi"]),
                    "cheapest": None if best is None else f"{best['defense_label']} at {best['split']}",
                    "cheapest_cost": None if best is None else num(best["cost"])})
    return out


def _f(x: Any, digits: int = 2) -> str:
    v = num(x)
    return "–" if v is None else f"{v:.{digits}f}"


def pipeline_section(df: pd.DataFrame) -> list:
    """The section's flowables (empty when the store has no S > 1 rows)."""
    if not has_pipeline(df):
        return []
    story: list = [para(escape(TITLE), "h1"),
                   para(escape("Runs whose server trunk is split into S stage parties ([training] stages). A stage "
                               "whose first block is d sees the hidden states entering block d, as a server at "
                               "split d does, and the gradients the next stage sends back."))]
    rows = pipeline_rows(df)
    s = frontier_settings(rows)
    for _, g in s.groupby("threat_label", sort=True):
        _, sentences = threat_verdict(g)
        story += [para(escape(x), "verdict") for x in sentences]
    pos = position_table(df)
    if not pos.empty:
        story.append(para("Leakage by stage position", "h2"))
        head = ["S", "Threat", "First block seen", "Attack", "Defense", "Leak [95 %]"]
        body = [[text(h, "head") for h in head]]
        for _, r in pos.iterrows():
            body.append([text(r["stages"]), text(r["threat_label"]), text(int(r["first_block"])),
                         text(r["attack_label"]), text(r["defense_label"]),
                         text(f"{_f(r['leak'])} [{_f(r['leak_lo'])}, {_f(r['leak_hi'])}] ({level(num(r['leak_hi']))})")])
        story.append(table(body, [1 * cm, 3.2 * cm, 2.2 * cm, 3.6 * cm, 3.2 * cm, PORTRAIT_W - 13.2 * cm]))
    tam = tamper_table(df)
    if not tam.empty:
        story.append(para("Tamper impact", "h2"))
        body = [[text(h, "head") for h in ("S", "Threat", "Tampering", "Defense", "Perplexity", "Clean")]]
        for _, r in tam.iterrows():
            body.append([text(r["stages"]), text(r["threat"]), text(r["attack"]), text(r["defense"]),
                         text(_f(r["perplexity"])), text(_f(r["clean_perplexity"]))])
        story.append(table(body, [1 * cm, 3.2 * cm, 5 * cm, 3.2 * cm, 2 * cm, PORTRAIT_W - 14.4 * cm]))
    det = detection_table(df)
    if not det.empty:
        story.append(para("Detection (transition audit)", "h2"))
        body = [[text(h, "head") for h in ("S", "Threat", "Attack", "Audit", "Audited / steps", "Flagged",
                                           "Extra compute", "Replaced (steps lost)")]]
        for _, r in det.iterrows():
            body.append([text(r["stages"]), text(r["threat"]), text(r["attack"]), text(r["defense"]),
                         text(f"{r['audited']} / {r['transitions']}"
                              + (" (checked nothing)" if r.get("warning") else "")), text(r["flagged"]),
                         text(_f(r["extra_compute"])), text(f"{r['replacements']} ({r['steps_lost']})")])
        story.append(table(body, [0.8 * cm, 2.6 * cm, 3 * cm, 3 * cm, 2 * cm, 1.4 * cm, 1.6 * cm,
                                  PORTRAIT_W - 14.4 * cm]))
    return story
