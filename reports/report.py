"""The PDF report of a results directory: ``build_report(DIR)`` writes ``DIR/report.pdf``.

Pages, for someone deciding whether a split configuration is safe:

1. verdict per threat (strongest attack without and with each defense, in words and as a table), the run's
   config and package versions;
2. the threat-model matrix, every cell with its metrics and utility, failed cells with their error;
3. leakage versus the split depth (embedding only vs embedding + k blocks), no defense;
4. privacy versus utility per defense;
5. original versus reconstructed samples, recovered PII highlighted;
6. the cost of each attack;
7. methods: metric definitions and what each threat model grants.

Reads only the results store (``suite.store.load_results``) and the public threat presets.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import pandas as pd
from reportlab.lib.units import cm
from reportlab.platypus import KeepTogether, NextPageTemplate, PageBreak, Spacer

from reports import figures, tables
from reports.markup import escape, sample_markup
from reports.pdf import FAILED_BG, LANDSCAPE_W, LEVEL_COLORS, PORTRAIT_W, document, image, para, table, text
from reports.tables import NO_DEFENSE, num
from reports.verdict import RULE, level, pct, threat_verdict
from suite.store import load_results
from suite.threats import THREATS

TITLES = ("1. Verdict per threat", "2. Threat-model matrix", "3. Leakage versus split depth",
          "4. Privacy versus utility", "5. Reconstructed samples", "6. Attack cost", "7. Methods")
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


def _per_split_header(entries: list[dict[str, Any]]) -> tuple[str, bool]:
    """Column title for the per-split token accuracy, and whether values can go without split labels (all
    rows cover the same splits)."""
    keys = {tuple(e["by_split"]) for e in entries if e["by_split"]}
    if len(keys) == 1:
        splits = next(iter(keys))
        if len(splits) > 1:
            return "Tok. acc at " + " / ".join(splits), True
    return "Tok. acc per split", False


def _verdict(df: pd.DataFrame, threats: list[str]) -> tuple[list, list]:
    """(the verdict in words, the table of the strongest attack per threat and defense)."""
    words = [_section(0), para(escape(RULE), "caption")]
    if df.empty:
        return [*words, para("The results store holds no cells yet.")], []
    entries = tables.verdict_cells(df, threats)
    split_head, bare = _per_split_header(entries)
    head = ["Threat", "Defense", "Strongest attack", "Split", "Tok. acc", "BLEU\u20114", "ROUGE\u20111", "PII",
            "Utility", split_head]
    rows, extra = [[text(h, "head") for h in head]], []
    for threat in threats:
        mine = [e for e in entries if e["threat"] == threat]
        lvl, sentence = threat_verdict(mine)
        badge = "#" + LEVEL_COLORS[lvl].hexval()[2:]
        words.append(para(f'<font backColor="{badge}"><b>&nbsp;{lvl.upper()}&nbsp;</b></font> '
                          f"{escape(sentence)}", "verdict"))
        first = len(rows)
        for e in mine:
            b, i = e["best"], len(rows)
            name = para(f"<b>{escape(threat)}</b>" if i == first else f'<font color="#888888">{escape(threat)}</font>',
                        "cell")
            if b is None:
                cells = "the only cell" if e["n"] == 1 else f"all {e['n']} cells"
                rows.append([name, text(e["defense"]), text(f"{cells} failed: {e['error']}"), *[""] * 7])
                extra += [("SPAN", (2, i), (-1, i)), ("BACKGROUND", (2, i), (-1, i), FAILED_BG)]
                continue
            by_split = (" / " if bare else ", ").join(
                _f(v, 2) if bare else f"{s}: {_f(v, 2)}" for s, v in e["by_split"].items())
            if e["failed"]:
                by_split += f" ({e['failed']} of {e['n']} cells failed)"
            rows.append([name, text(e["defense"]), text(b["attack_label"]), text(b["split"]),
                         text(_f(b["token_accuracy"], 2), "cellr"), text(_f(b["bleu4"], 1), "cellr"),
                         text(_f(b["rouge1"], 1), "cellr"), text(_f(b["pii_recovery"], 2), "cellr"),
                         text(_f(b["utility"], 3), "cellr"), text(by_split)])
            extra.append(("BACKGROUND", (4, i), (4, i), LEVEL_COLORS[level(num(b["token_accuracy"]))]))
        extra.append(("LINEABOVE", (0, first), (-1, first), 0.8, "#555555"))
    widths = [2.4 * cm, 3.0 * cm, 2.8 * cm, 0.95 * cm, 1.1 * cm, 1.3 * cm, 1.5 * cm, 0.9 * cm, 1.15 * cm]
    widths.append(PORTRAIT_W - sum(widths))
    detail = [para("Strongest attack per threat and defense", "h2free"), table(rows, widths, extra),
              para("Strongest attack = highest token accuracy over attacks and splits among finished cells, "
                   "shown at the split where it was reached; token accuracy shaded red = leaks, amber = partial, "
                   "green = little. BLEU/ROUGE 0–100, token accuracy and PII recovery "
                   "0–1, utility = held-out loss at that split (lower is better). Every cell: section 2; "
                   "definitions: section 7.", "caption")]
    return words, detail


# -- 2. matrix ------------------------------------------------------------------------------------------------


def _matrix(df: pd.DataFrame, threats: list[str]) -> list:
    out = [_section(1)]
    if df.empty:
        return [*out, para("No cells.")]
    head = ["Split", "Threat", "Attack", "Defense", "BLEU\u20114", "ROUGE\u20111", "ROUGE\u20112", "ROUGE\u2011L",
            "Tok. acc", "Exact", "PII", "Utility", "Status / note"]
    rows, extra, group = [[text(h, "head") for h in head]], [], None
    for _, r in tables.matrix_rows(df, threats).iterrows():
        i = len(rows)
        if group is not None and group != (r["model"], r["split"]):
            extra.append(("LINEABOVE", (0, i), (-1, i), 0.9, "#555555"))
        group = (r["model"], r["split"])
        base = [text(r["split"]), text(r["threat_label"]), text(r["attack_label"]), text(r["defense_label"])]
        if r["ok"]:
            metrics = [text(_f(r[m], d), "cellr") for m, d in (("bleu4", 1), ("rouge1", 1), ("rouge2", 1),
                       ("rougeL", 1), ("token_accuracy", 3), ("exact_match", 3), ("pii_recovery", 3))]
            note = r["note"] if isinstance(r["note"], str) and r["note"] else ""
            status = para("ok" + (f' <font color="#666666">– {escape(note)}</font>' if note else ""), "cell")
            rows.append([*base, *metrics, text(_f(r["utility"], 3), "cellr"), status])
            extra.append(("BACKGROUND", (8, i), (8, i), LEVEL_COLORS[level(num(r["token_accuracy"]))]))
        else:
            err = para(f'<font color="#a00000"><b>failed:</b> {escape(r["error"] or "no error recorded")}</font>',
                       "cell")
            rows.append([*base, err, *[""] * 8])
            extra += [("SPAN", (4, i), (-1, i)), ("BACKGROUND", (0, i), (-1, i), FAILED_BG)]
    widths = [1.1 * cm, 2.4 * cm, 2.8 * cm, 3.6 * cm] + [1.5 * cm] * 7 + [1.25 * cm]
    widths.append(LANDSCAPE_W - sum(widths))
    return [*out, para("One row per cell; token accuracy shaded by the verdict rule (red = leaks, amber = "
                       "partial, green = little). Cells whose attack needs more than the threat grants are not "
                       "run and not listed.", "caption"), table(rows, widths, extra)]


# -- 3./4. figures ----------------------------------------------------------------------------------------------


def _figures(df: pd.DataFrame) -> list:
    out = [_section(2)]
    png = figures.leakage_vs_split(tables.leakage_by_split(df)) if not df.empty else None
    if png is None:
        out.append(para("No finished cell without a defense: nothing to compare across splits."))
    else:
        out += [image(png, PORTRAIT_W, 8 * cm),
                para("Best BLEU-4 and ROUGE-1 of each attack (under each threat) without a defense, for a client "
                     "head of the embedding only (k=0) or the embedding plus k decoder blocks. Higher = more of "
                     "the private text recovered.", "caption")]
    out.append(_section(3))
    png = figures.privacy_utility(tables.privacy_utility(df)) if not df.empty else None
    if png is None:
        out.append(para("No finished cell with both leakage and utility: nothing to plot."))
    else:
        out += [image(png, PORTRAIT_W, 10.5 * cm),
                para("One point per (defense, parameters, k): the token accuracy of the strongest attack over "
                     "all threats and attacks versus the held-out loss of the fine-tuned model (lower = better "
                     "utility). Marker shape = split k; grey = no defense, in every panel for reference. Shaded bands: leaks (red) and little (green). The best "
                     "place is bottom left.", "caption")]
    reports = [(label, rep) for label, rep in tables.defense_reports(df) if rep] if not df.empty else []
    if reports:
        rows = [[text("Defense", "head"), text("What it reports (latest finished cell)", "head")]]
        rows += [[text(label), text(_flat(rep))] for label, rep in reports]
        out += [para("What each defense reports", "h2"), table(rows, [4.5 * cm, PORTRAIT_W - 4.5 * cm])]
    return out


# -- 5. samples -----------------------------------------------------------------------------------------------


def _sample_block(title: str, row: pd.Series, n: int) -> list:
    samples = row["samples"] if isinstance(row["samples"], list) else []
    if not samples:
        return []
    rows = [[text("Original (private)", "head"), text("Reconstruction (attacker)", "head")]]
    rows += [[para(ref, "sample"), para(hyp, "sample")] for ref, hyp in map(sample_markup, samples[:n])]
    return [KeepTogether([para(escape(title), "h2"), table(rows, [LANDSCAPE_W / 2] * 2)])]


def _samples(df: pd.DataFrame, threats: list[str]) -> list:
    out = [_section(4), para('<font backColor="#ffd6d6" color="#a00000"><b>Bold red</b></font> = a PII value '
                             "the attacker recovered verbatim; <u>underlined</u> = a PII value in the original "
                             "that it did not recover. \ufffd marks bytes that do not decode to text.", "caption")]
    blocks = []
    has = df[[isinstance(s, list) and len(s) > 0 for s in df["samples"]]] if not df.empty else df
    for threat in threats:
        cells = has[(has["threat_label"] == threat) & (has["defense"] == NO_DEFENSE)]
        b = tables.strongest(cells)
        if b is not None:
            title = (f"{threat}: strongest attack without a defense — {b['attack_label']} at {b['split']} "
                     f"(token accuracy {pct(num(b['token_accuracy']))})")
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
    used = set(df["threat"]) if not df.empty else set()
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
    df = tables.prepare(load_results(directory))
    threats = tables.threat_order(df, list(THREATS)) if not df.empty else []
    path = directory / "report.pdf"
    models = ", ".join(sorted(map(str, df["model"].dropna().unique()))) or "no model"
    where = str(directory.resolve())
    where = where if len(where) <= 100 else "…" + where[-99:]
    doc = document(path, f"splitleak report — {models}", f"splitleak report — {where}")
    words, detail = _verdict(df, threats)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    story = [
        para(escape(f"splitleak privacy report — {models}"), "title"),
        para(escape(f"{directory.resolve()} · generated {stamp} · {len(df)} cells"), "subtitle"),
        *words, *(_run_config(df) if not df.empty else []), *detail,
        NextPageTemplate("landscape"), PageBreak(), *_matrix(df, threats),
        NextPageTemplate("portrait"), PageBreak(), *_figures(df),
        NextPageTemplate("landscape"), PageBreak(), *_samples(df, threats),
        NextPageTemplate("portrait"), PageBreak(), *_cost(df), Spacer(1, 6), *_methods(df),
    ]
    doc.build(story)
    return path
