"""The PDF report of a results directory: ``build_report(DIR)`` writes ``DIR/report.pdf``.

Pages, for someone deciding whether a split configuration is safe:

1. the verdict table (``verdict.VerdictRow``, one row per threat and section: level, strongest attack and its
   advantage, the cheapest tested setting that reaches little or none, defenses that do not address it) and at
   most three sentences, on one page; then the verdict in words per threat, the run's config and versions;
2. the threat-model matrix, every cell with its metrics and utility, failed cells with their error;
3. leakage versus the split depth (embedding only vs embedding + k blocks), no defense;
4. privacy versus utility per defense;
5. original versus reconstructed samples, recovered PII highlighted;
6. the cost of each attack;
7. methods: metric definitions and what each threat model grants.

Reads only the results store (``suite.experiment.store.load_results``) and the public threat presets.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import pandas as pd
from reportlab.lib.units import cm
from reportlab.platypus import KeepTogether, NextPageTemplate, PageBreak, Spacer

from reports import figures, tables
from reports import inference as inference_section
from reports import memorisation as memo
from reports.frontier import pareto
from reports.frontier import settings as frontier_settings
from reports.markup import escape, sample_markup
from reports.pdf import FAILED_BG, LANDSCAPE_W, LEVEL_COLORS, PORTRAIT_W, document, image, para, table, text
from reports.pipeline import pipeline_section
from reports.pipeline import verdict_rows as pipeline_verdict_rows
from reports.tables import NO_DEFENSE, num
from reports.verdict import (
    RULE,
    Provider,
    VerdictRow,
    advantage_text,
    cheapest_text,
    from_dicts,
    key_sentences,
    level,
    not_addressing,
    pct,
    signed_pct,
    still_leaks,
    threat_verdict,
    training_rows,
    verdict_rows,
)
from suite.experiment.store import load_results
from suite.interfaces.presets import THREATS

TITLES = ("1. Verdict", "2. Threat-model matrix", "3. Leakage versus split depth",
          "4. Privacy–utility frontier", "5. Reconstructed samples", "6. Attack cost", "7. Methods")
# Page 1's rows, section by section (``reports.verdict``'s schema): a new section adds its provider here.
PAGE_ONE: list[Provider] = [
    lambda frame: training_rows(frame[~memo.memorisation_rows(frame)]),  # reconstructions (training, not S > 1)
    lambda frame: from_dicts(pipeline_verdict_rows(frame)),
    lambda frame: from_dicts(memo.verdict_rows(frame)),
    lambda frame: from_dicts(inference_section.verdict_rows(frame)),
]
SAMPLES_STRONGEST, SAMPLES_DEFENDED = 3, 2  # samples shown for each threat's strongest cell / each defense


def _f(value: Any, digits: int) -> str:
    v = num(value)
    return "–" if v is None else f"{v:.{digits}f}"


def _section(i: int) -> Any:
    return para(escape(TITLES[i]), "h1")


# -- 1. verdict ---------------------------------------------------------------------------------------------


def _flat(value: Any, nested: bool = False) -> str:
    """A config value as one line: ``a=1, b=(c=2, d=3), e=[x, y]``; None and empty values left out."""
    if isinstance(value, dict):
        named = nested and isinstance(value.get("name"), str)
        inner = ", ".join(f"{k}={_flat(v, True)}" for k, v in value.items()
                          if v not in (None, {}, []) and not (named and k == "name"))
        return f"{value['name']}({inner})" if named else f"({inner})" if nested else inner
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flat(v, True) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _run_config(df: pd.DataFrame) -> list:
    """The run's config (latest row), store counts and package versions, as a compact key/value table."""
    info = tables.run_info(df)
    cfg = dict(info["config"])
    model_extra = {k: v for k, v in (cfg.pop("model", None) or {}).items() if k != "name"}
    model = "; ".join(info["models"]) or "–"
    rows = [["model", model + (f"; {_flat(model_extra)}" if _flat(model_extra) else "")]]
    rows += [[section, _flat(value)] for section, value in cfg.items()]
    cells = f"{info['cells']} in the store: {info['ok']} ok, {info['failed']} failed"
    if info["n_configs"] > 1:
        cells += f"; the store holds {info['n_configs']} different configs, shown is the latest"
    rows.append(["cells", cells])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())) or "not recorded"
    if info["n_versions"] > 1:
        versions += f" (latest of {info['n_versions']} different version sets)"
    rows.append(["versions", versions])
    return [para("Run", "h2"), table([[text(k, "head"), text(v)] for k, v in rows],
                                     [2 * cm, PORTRAIT_W - 2 * cm], header=False)]


def _interval(r: Any) -> str:
    lo, hi = num(r["leak_lo"]), num(r["leak_hi"])
    return _f(r["leak"], 2) + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and lo != hi else "")


def _cost_text(r: Any, key: str = "cost") -> str:
    v = num(r[key])
    if v is None:
        return "–"
    if key == "cost" and num(r["cost_lo"]) is not None and num(r["cost_hi"]) is not None:
        return f"{signed_pct(v)} [{signed_pct(num(r['cost_lo']))}, {signed_pct(num(r['cost_hi']))}]"
    return signed_pct(v)


def page_one(df: pd.DataFrame) -> list:
    """Page 1: the verdict table (one row per threat and section) and at most three sentences."""
    out = [_section(0)]
    if df.empty:
        return [*out, para("The results store holds no cells yet.")]
    rows: list[VerdictRow] = verdict_rows(df, PAGE_ONE)
    sections = len({r.section for r in rows}) > 1
    head = (["Section"] if sections else []) + ["Threat", "Level", "Strongest attack (no defense)",
                                                "Advantage over blind [95 % CI]",
                                                "Cheapest tested setting reaching little or none: cost",
                                                "Not addressed by"]
    table_rows, extra = [[text(h, "head") for h in head]], []
    for r in rows:
        i = len(table_rows)
        cheap = escape(cheapest_text(r)) + (f'<br/><font color="#666666">{escape(r.note)}</font>' if r.note else "")
        table_rows.append(([text(r.section)] if sections else []) + [
            para(f"<b>{escape(r.threat)}</b>", "cell"), text(r.level), text(r.attack),
            text(advantage_text(r), "cellr"), para(cheap, "cell"), text(", ".join(r.not_addressed) or "–")])
        c = 2 if sections else 1
        extra.append(("BACKGROUND", (c, i), (c, i), LEVEL_COLORS.get(r.level, LEVEL_COLORS["unknown"])))
    widths = ([1.6 * cm] if sections else []) + [2.6 * cm, 1.3 * cm, 3.6 * cm, 2.6 * cm, 5.2 * cm]
    widths.append(PORTRAIT_W - sum(widths))
    out += [table(table_rows, widths, extra)]
    settings = [r.extra["settings"] for r in rows if isinstance(r.extra.get("settings"), pd.DataFrame)]
    st = pd.concat(settings) if settings else pd.DataFrame(columns=["is_none"])
    steps = sorted({int(v) for v in pd.to_numeric(df["steps"], errors="coerce").dropna()}) if "steps" in df else []
    budget = f"{'/'.join(map(str, steps))} training steps" if steps else ""
    out += [para(escape(s), "verdict") for s in key_sentences(rows, st, budget)]
    out.append(para(escape(RULE) + " Advantage: at the split where it is worst, with its 95 % interval; cost with "
                    "its 95 % interval. A setting counts only if it acted and the "
                    "threat's strongest attack also ran against it; 'not addressed': the defense protects nothing "
                    "that threat observes. Details: the next page and section 4.", "caption"))
    return out


def _verdict(df: pd.DataFrame, threats: list[str], settings: pd.DataFrame) -> tuple[list, list]:
    """(the verdict in words, the table of the worst split per threat and defense setting)."""
    words = [para("Verdict per threat, in words", "h2")]
    if df.empty:
        return [], []
    head = ["Threat", "Defense", "Worst split: strongest attack", "Leakage [95 % CI]", "Raw tok. acc", "Blind",
            "Cost (perplexity)", "vs central.", "Level per split"]
    rows, extra = [[text(h, "head") for h in head]], []
    for threat in threats:
        cells = df[df["threat_label"] == threat]
        idle = not_addressing(cells, str(cells["threat"].iloc[0]))
        mine = settings[(settings["threat_label"] == threat) & ~settings["defense"].isin(idle)]
        if mine.empty:
            failed = cells[~cells["ok"]]
            err = str(failed.iloc[0]["error"]) if not failed.empty else "no error recorded"
            err = err if len(err) <= 120 else err[:119] + "…"
            lvl, sentence = "unknown", [f"{threat}: every cell failed ({err})."]
        else:
            lvl, sentence = threat_verdict(mine)
        if idle:
            sentence.append(f"Not addressed (protects nothing {threat} observes): {', '.join(idle)}.")
        badge = "#" + LEVEL_COLORS[lvl].hexval()[2:]
        words.append(para(f'<font backColor="{badge}"><b>&nbsp;{lvl.upper()}&nbsp;</b></font> '
                          f"{escape(' '.join(sentence))}", "verdict"))
        first = len(rows)
        for label in tables.defense_order(cells):
            g = mine[mine["defense_label"] == label]
            i = len(rows)
            name = para(f"<b>{escape(threat)}</b>" if i == first else f'<font color="#888888">{escape(threat)}</font>',
                        "cell")
            n_failed = int((~cells.loc[cells["defense_label"] == label, "ok"]).sum())
            if g.empty:
                err = cells.loc[cells["defense_label"] == label, "error"].iloc[0]
                rows.append([name, text(label), text(f"all {n_failed} cells failed: {err}"), *[""] * 6])
                extra += [("SPAN", (2, i), (-1, i)), ("BACKGROUND", (2, i), (-1, i), FAILED_BG)]
                continue
            w = g.sort_values(["leak_hi", "leak"], ascending=False).iloc[0]
            per_split = ", ".join(f"{r['split']} {level(num(r['leak_hi']))}" + (" (did not act)" if r["acted"] is False
                                                                                 else "")
                                  for _, r in g.sort_values("head_blocks").iterrows())
            if n_failed:
                per_split += f" ({n_failed} cells failed)"
            kind = "" if w["kind"] == "advantage" else " raw"
            rows.append([name, text(label), text(f"{w['split']}: {w['attack_label']}"),
                         text(_interval(w) + kind, "cellr"), text(_f(w["raw"], 2), "cellr"),
                         text(_f(w["blind"], 2), "cellr"), text(_cost_text(w), "cellr"),
                         text(_cost_text(w, "cost_central"), "cellr"), text(per_split)])
            extra.append(("BACKGROUND", (3, i), (3, i), LEVEL_COLORS[level(num(w["leak_hi"]))]))
        extra.append(("LINEABOVE", (0, first), (-1, first), 0.8, "#555555"))
    widths = [2.2 * cm, 2.8 * cm, 3.0 * cm, 2.4 * cm, 1.2 * cm, 1.0 * cm, 2.2 * cm, 1.3 * cm]
    widths.append(PORTRAIT_W - sum(widths))
    detail = [para("Strongest attack per threat and defense setting (worst split)", "h2free"),
              table(rows, widths, extra),
              para("Leakage = the strongest attack's token accuracy over every attack the threat ran, as advantage "
                   "over the blind baseline where measured ('raw' where not), with its 95 % bootstrap interval over "
                   "records × seeds, at the split where it is worst; shaded by level. Raw tok. acc = that attack's "
                   "share of tokens recovered; Blind = what the blind attack (no observations) gets on the same "
                   "records. Cost = held-out perplexity increase over the undefended model at the same split "
                   "(interval from the held-out loss's); vs central. = over a centralised fine-tune on the same "
                   "data. Every setting and split: section 4; every cell: section 2.", "caption")]
    return words, detail


def _upper(r: Any) -> float | None:
    """The upper end of a cell's headline leakage (advantage where measured), for shading."""
    for key in ("adv_token_accuracy_hi", "adv_token_accuracy", "token_accuracy_hi", "token_accuracy"):
        v = num(r.get(key))
        if v is not None:
            return v
    return None


# -- 2. matrix ------------------------------------------------------------------------------------------------


def _matrix(df: pd.DataFrame, threats: list[str]) -> list:
    out = [_section(1)]
    if df.empty:
        return [*out, para("No cells.")]
    head = ["Split", "Threat", "Attack", "Defense", "BLEU\u20114", "ROUGE\u20111", "ROUGE\u20112", "ROUGE\u2011L",
            "Tok. acc", "Adv. tok", "Exact", "PII", "Utility", "Status / note"]
    rows, extra, group = [[text(h, "head") for h in head]], [], None
    for _, r in tables.matrix_rows(df, threats).iterrows():
        i = len(rows)
        if group is not None and group != (r["model"], r["split"]):
            extra.append(("LINEABOVE", (0, i), (-1, i), 0.9, "#555555"))
        group = (r["model"], r["split"])
        base = [text(r["split"]), text(r["threat_label"]), text(r["attack_label"]), text(r["defense_label"])]
        if r["ok"]:
            metrics = [text(_f(r.get(m), d), "cellr") for m, d in (("bleu4", 1), ("rouge1", 1), ("rouge2", 1),
                       ("rougeL", 1), ("token_accuracy", 3), ("adv_token_accuracy", 3), ("exact_match", 3),
                       ("pii_recovery", 3))]
            note = r["note"] if isinstance(r["note"], str) and r["note"] else ""
            status = para("ok" + (f' <font color="#666666">– {escape(note)}</font>' if note else ""), "cell")
            rows.append([*base, *metrics, text(_f(r["utility"], 3), "cellr"), status])
            extra.append(("BACKGROUND", (8, i), (9, i), LEVEL_COLORS[level(_upper(r))]))
        else:
            err = para(f'<font color="#a00000"><b>failed:</b> {escape(r["error"] or "no error recorded")}</font>',
                       "cell")
            rows.append([*base, err, *[""] * 9])
            extra += [("SPAN", (4, i), (-1, i)), ("BACKGROUND", (0, i), (-1, i), FAILED_BG)]
    widths = [1.1 * cm, 2.4 * cm, 2.8 * cm, 3.6 * cm] + [1.4 * cm] * 8 + [1.25 * cm]
    widths.append(LANDSCAPE_W - sum(widths))
    return [*out, para("One row per cell; token accuracy and its advantage over the blind attack on the same "
                       "records shaded by the verdict rule on the upper end of the interval (red = most, amber = "
                       "partial, green = little or none). Blind rows are cells of the attack 'blind'. Cells whose attack needs more than the threat grants are not "
                       "run and not listed.", "caption"), table(rows, widths, extra)]


# -- 3./4. figures ----------------------------------------------------------------------------------------------


def _figures(df: pd.DataFrame, threats: list[str], settings: pd.DataFrame) -> list:
    out = [_section(2)]
    depth = tables.leakage_by_split(df) if not df.empty else pd.DataFrame()
    png = figures.leakage_vs_split(depth) if not depth.empty else None
    if png is None:
        out.append(para("No finished cell without a defense: nothing to compare across splits."))
    else:
        out += [image(png, PORTRAIT_W, 6.2 * cm),
                para("BLEU-4, ROUGE-L and token accuracy of each attack without a defense, at the threat where it "
                     "recovers most, for a client head of the embedding only (k=0) or the embedding plus k decoder "
                     "blocks; bars = 95 % bootstrap intervals over the records. Grey hatched = the blind baseline "
                     "(public text only, no observation). Higher = more of the private text recovered.", "caption"),
                _depth_table(depth)]
    out += _frontier(settings, threats)
    out += _adaptive(df)
    reports = [(label, rep) for label, rep in tables.defense_reports(df) if rep] if not df.empty else []
    if reports:
        rows = [[text("Defense", "head"), text("What it reports (latest finished cell)", "head")]]
        rows += [[text(label), text(_flat(rep))] for label, rep in reports]
        out += [para("What each defense reports", "h2"), table(rows, [4.5 * cm, PORTRAIT_W - 4.5 * cm])]
    return out


def _ci(r: Any, metric: str, digits: int) -> str:
    lo, hi = num(r[metric + "_lo"]), num(r[metric + "_hi"])
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None and lo != hi else ""
    return _f(r[metric], digits) + ci


def _depth_table(depth: pd.DataFrame) -> Any:
    """Split × attack: BLEU-4, ROUGE-L and token accuracy with their intervals (the figure's numbers)."""
    rows = [[text(h, "head") for h in ("Split", "Attack", "At threat", "BLEU-4 [95 % CI]", "ROUGE-L [95 % CI]",
                                       "Token accuracy [95 % CI]")]]
    extra = []
    order = depth.assign(_b=depth["attack"] == "blind").sort_values(["head_blocks", "_b", "token_accuracy"],
                                                                       ascending=[True, True, False])
    group = None
    for _, r in order.iterrows():
        i = len(rows)
        if group is not None and group != r["head_blocks"]:
            extra.append(("LINEABOVE", (0, i), (-1, i), 0.8, "#555555"))
        group = r["head_blocks"]
        rows.append([text(r["split"]), text(r["attack_label"]), text(r["threat_label"]),
                     text(_ci(r, "bleu4", 1), "cellr"), text(_ci(r, "rougeL", 1), "cellr"),
                     text(_ci(r, "token_accuracy", 3), "cellr")])
        if r["attack"] == "blind":
            extra.append(("TEXTCOLOR", (0, i), (-1, i), "#666666"))
    widths = [1.1 * cm, 4.2 * cm, 2.8 * cm, 3.0 * cm, 3.0 * cm]
    widths.append(PORTRAIT_W - sum(widths))
    return table(rows, widths, extra)


def _frontier(settings: pd.DataFrame, threats: list[str]) -> list:
    out = [_section(3)]
    if settings.empty or not (~settings["is_none"]).any():
        return [*out, para("No finished defended cell: no frontier to draw.")]
    for threat in threats:
        mine = settings[settings["threat_label"] == threat]
        if mine.empty or not (~mine["is_none"]).any():
            continue
        out.append(para(escape(threat), "h2"))
        png = figures.frontier_png(mine)
        if png is not None:
            out.append(image(png, PORTRAIT_W, 11 * cm))
        else:
            out.append(para("No setting with a measured utility: no frontier to draw.", "caption"))
        front = set(mine.index[pareto(mine.assign(cost=mine["cost"].astype(float)))])
        head = ["Defense", "Split", "Strongest attack", "Leakage [95 % CI]", "Level", "Blind", "Cost (perplexity)",
                "vs central.", "Acted"]
        rows, extra = [[text(h, "head") for h in head]], []
        for idx, r in mine.sort_values(["is_none", "defense_label", "head_blocks"], ascending=[False, True, True]).iterrows():
            i = len(rows)
            lvl = level(num(r["leak_hi"]))
            acted = {True: "yes", False: "did not act", None: "–"}[r["acted"]] if not r["is_none"] else ""
            label = ("◆ " if idx in front else "") + r["defense_label"] + (f"; {r['guarantee']}" if r["guarantee"] else "")
            rows.append([text(label), text(r["split"]),
                         text(r["attack_label"]), text(_interval(r) + ("" if r["kind"] == "advantage" else " raw"),
                                                       "cellr"),
                         text(lvl), text(_f(r["blind"], 2), "cellr"), text(_cost_text(r), "cellr"),
                         text(_cost_text(r, "cost_central"), "cellr"), text(acted + (f" ({r['act_note']})"
                                                                                     if r["act_note"] else ""))])
            extra.append(("BACKGROUND", (4, i), (4, i), LEVEL_COLORS[lvl]))
        widths = [3.0 * cm, 1.0 * cm, 2.6 * cm, 2.4 * cm, 1.2 * cm, 1.0 * cm, 2.3 * cm, 1.4 * cm]
        widths.append(PORTRAIT_W - sum(widths))
        out += [table(rows, widths, extra)]
    out.append(para("Each point is a defense setting at a split: x = held-out perplexity increase over the "
                    "undefended model at the same split, y = the strongest attack's token accuracy over everything "
                    "the threat sees, as advantage over the blind baseline where measured; bars = 95 % intervals. "
                    "Grey = no defense (cost 0). The black line and ringed points (◆ in the tables) are the Pareto "
                    "frontier: no other tested setting is both cheaper and leaks less. Dashed = the blind "
                    "baseline. Shaded: most (red) and little (green).", "caption"))
    return out


def _adaptive(df: pd.DataFrame) -> list:
    pairs = tables.adaptive_pairs(df) if not df.empty else pd.DataFrame()
    if pairs.empty:
        return []
    rows = [[text(h, "head") for h in ("Threat", "Attack", "Defense", "Split", "Tok. acc non-adaptive",
                                        "Tok. acc adaptive", "Adv. non-adaptive", "Adv. adaptive")]]
    rows += [[text(r["threat_label"]), text(r["attack"]), text(r["defense_label"]), text(r["split"]),
              *[text(_f(r[c], 3), "cellr") for c in ("acc_0", "acc_1", "adv_0", "adv_1")]]
             for _, r in pairs.iterrows()]
    widths = [2.6 * cm, 3.0 * cm, 3.2 * cm, 1.1 * cm] + [1.9 * cm] * 3
    widths.append(PORTRAIT_W - sum(widths))
    return [para("Adaptive versus non-adaptive attackers", "h2"), table(rows, widths),
            para("The same attack with and without simulating the defense on its own shadow pipeline (public "
                 "parameters, fresh randomness). The verdict takes the stronger of the two.", "caption")]


# -- 5. samples -----------------------------------------------------------------------------------------------


def _sample_block(title: str, row: pd.Series, n: int) -> list:
    samples = row["samples"] if isinstance(row["samples"], list) else []
    if not samples:
        return []
    rows = [[text("Original (private)", "head"), text("Reconstruction (attacker)", "head")]]
    rows += [[para(ref, "sample"), para(hyp, "sample")] for ref, hyp in map(sample_markup, samples[:n])]
    return [KeepTogether([para(escape(title), "h2"), table(rows, [LANDSCAPE_W / 2] * 2)])]


def _adv_text(r: Any) -> str:
    v, lo, hi = num(r.get("adv_token_accuracy")), num(r.get("adv_token_accuracy_lo")), num(r.get("adv_token_accuracy_hi"))
    if v is None:
        return ""
    return f", advantage over blind {v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def _deepest_leaking(cells: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """The strongest undefended cell at the deepest split that still leaks (whole advantage interval above the
    'little' band), or at the deepest split when none does; and a phrase saying which."""
    ok = cells[cells["ok"]]
    if ok.empty:
        return None, ""
    lower = [num(r.get("adv_token_accuracy_lo")) if num(r.get("adv_token_accuracy")) is not None else
             (num(r.get("token_accuracy_lo")) if num(r.get("token_accuracy_lo")) is not None else
              num(r.get("token_accuracy"))) for _, r in ok.iterrows()]
    ok = ok.assign(_lower=lower)
    leaking = ok[[still_leaks(v) for v in ok["_lower"]]]
    if not leaking.empty:
        k = leaking["head_blocks"].max()
        return tables.strongest(leaking[leaking["head_blocks"] == k]), "deepest split that still leaks, no defense"
    k = ok["head_blocks"].max()
    return tables.strongest(ok[ok["head_blocks"] == k]), "no split still leaks; the deepest split, no defense"


def _samples(df: pd.DataFrame, threats: list[str]) -> list:
    out = [_section(4), para('<font backColor="#ffd6d6" color="#a00000"><b>Bold red</b></font> = a PII value '
                             "the attacker recovered verbatim; <u>underlined</u> = a PII value in the original "
                             "that it did not recover. \ufffd marks bytes that do not decode to text.", "caption")]
    blocks = []
    has = df[[isinstance(s, list) and len(s) > 0 for s in df["samples"]]] if not df.empty else df
    for threat in threats:
        cells = has[(has["threat_label"] == threat) & (has["defense"] == NO_DEFENSE)]
        b, why = _deepest_leaking(cells)
        if b is not None:
            title = (f"{threat}: {why} — {b['attack_label']} at {b['split']} "
                     f"(token accuracy {pct(num(b['token_accuracy']))}{_adv_text(b)})")
            blocks += _sample_block(title, b, SAMPLES_STRONGEST)
    for label in tables.defense_order(has) if not has.empty else []:
        cells = has[(has["defense_label"] == label) & (has["defense"] != NO_DEFENSE)]
        b = tables.strongest(cells)
        if b is not None:
            title = (f"With {label}: strongest attack over all threats — {b['attack_label']} at {b['split']}, "
                     f"{b['threat_label']} (token accuracy {pct(num(b['token_accuracy']))})")
            blocks += _sample_block(title, b, SAMPLES_DEFENDED)
    return out + (blocks or [para("No samples stored in this results directory.")])


# -- 6./7. cost and methods --------------------------------------------------------------------------------------


def _cost(df: pd.DataFrame) -> list:
    out = [_section(5)]
    costs = tables.cost_rows(df) if not df.empty else pd.DataFrame()
    if costs.empty:
        return [*out, para("No finished cells: no costs measured.")]
    rows = [[text(h, "head") for h in ("Attack", "Split", "Cells", "Mean seconds", "Max seconds",
                                       "Peak RSS (MiB)")]]
    rows += [[text(r["attack_label"]), text(r["split"]), text(int(r["cells"]), "cellr"),
              text(_f(r["mean_s"], 3), "cellr"), text(_f(r["max_s"], 3), "cellr"), text(_f(r["rss"], 0), "cellr")]
             for _, r in costs.iterrows()]
    widths = [5 * cm, 2 * cm, 1.5 * cm, 2.5 * cm, 2.5 * cm]
    widths.append(PORTRAIT_W - sum(widths))
    return [*out, table(rows, widths),
            para("Wall-clock seconds of the attack alone (training excluded) and the peak resident memory of "
                 "the process that ran it, over the finished cells of each attack and split.", "caption")]


METRIC_TEXT = [
    ("BLEU-4", "corpus BLEU with nltk (one reference per reconstruction, TreebankWordTokenizer, case kept, "
               "smoothing method1) on detokenised text; 0–100."),
    ("ROUGE-1/2/L", "mean F1 from rouge-score with Porter stemming (lower-cased, punctuation ignored); 0–100."),
    ("Token accuracy", "fraction of non-padding token positions whose token the attacker got right; 0–1."),
    ("Exact match", "fraction of sequences whose every non-padding token is right; 0–1."),
    ("PII recovery", "fraction of the private records' PII fields (names, emails, phone numbers, ids…) that "
                     "appear verbatim (case-sensitive) in the reconstruction; 0–1, blank when the data has no PII."),
    ("Utility", "held-out loss of the fine-tuned split model on private-domain text; lower is better."),
    ("Cost", "attack wall-clock seconds and peak resident set size (MiB)."),
]


def _methods(df: pd.DataFrame) -> list:
    out = [_section(6), para("Metrics", "h2")]
    out += [para(f"<b>{escape(name)}</b>: {escape(desc)}") for name, desc in METRIC_TEXT]
    out.append(para(escape(RULE)))
    out.append(para("Threat models", "h2"))
    used = {str(t).partition(":")[0] for t in df["threat"]} if not df.empty else set()  # curious_stage:1 -> its preset
    rows = [[text("Threat", "head"), text("Who and what", "head"), text("Grants", "head")]]
    for name, t in THREATS.items():
        mark = "" if name in used else " (not in this run)"
        rows.append([text(name + mark), text(t.description),
                     text(", ".join(sorted(c.value for c in t.grants)))])
    for name in sorted(used - set(THREATS)):
        rows.append([text(str(name)), text("not a known preset"), text("–")])
    out.append(table(rows, [3.2 * cm, PORTRAIT_W - 7.7 * cm, 4.5 * cm]))
    out.append(para("An attack runs in a cell only when its threat grants every capability it requires; the "
                    "observations it receives are filtered to those capabilities.", "caption"))
    return out


# -- the document -------------------------------------------------------------------------------------------------


def build_report(directory: str | Path) -> Path:
    """Write ``directory/report.pdf`` from ``directory/results.sqlite`` and return its path."""
    directory = Path(directory)
    df, inference = inference_section.split_modes(tables.prepare(load_results(directory)))
    everything = pd.concat([df, inference]) if not inference.empty else df
    memorised = df[memo.memorisation_rows(df)]  # their own section; the rest reads reconstructions
    df = df[~memo.memorisation_rows(df)]
    threats = tables.threat_order(df, list(THREATS)) if not df.empty else []
    path = directory / "report.pdf"
    models = ", ".join(sorted(map(str, df["model"].dropna().unique()))) or "no model"
    where = str(directory.resolve())
    where = where if len(where) <= 100 else "…" + where[-99:]
    # the report quotes victims' text: built in a file created 0600 (whatever the umask), renamed when whole
    tmp = directory / ".report.pdf.tmp"
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
    doc = document(tmp, f"splitleak report — {models}", f"splitleak report — {where}")
    settings = frontier_settings(df)
    words, detail = _verdict(df, threats, settings)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    story = [
        para(escape(f"splitleak privacy report — {models}"), "title"),
        para(escape(f"{directory.resolve()} · generated {stamp} · {len(df)} cells"), "subtitle"),
        *page_one(everything), PageBreak(), *words, *(_run_config(df) if not df.empty else []), *detail,
        NextPageTemplate("landscape"), PageBreak(), *_matrix(df, threats),
        NextPageTemplate("portrait"), PageBreak(), *_figures(df, threats, settings),
        NextPageTemplate("landscape"), PageBreak(), *_samples(df, threats),
        *([NextPageTemplate("landscape"), PageBreak(), *memo.section(memorised)] if not memorised.empty else []),
        NextPageTemplate("portrait"), PageBreak(), *_cost(df), Spacer(1, 6), *pipeline_section(df), *_methods(df),
        *([NextPageTemplate("landscape"), PageBreak(), *inference_section.section(inference)]
          if not inference.empty else []),
    ]
    try:
        doc.build(story)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
