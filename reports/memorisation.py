"""The report's memorisation section: what the server's adapters, a colluder's model and the
released model remember of the canary victim's records.

Reads the store's memorisation rows (those with a ``memorisation`` breakdown): exposure against the number of
times a canary was inserted, per view; membership AUC and TPR at 1 % / 0.1 % FPR with intervals (and how
many false positives the low-FPR rate rests on); the canaries extracted verbatim; ROC curves on log-log axes.

Verdict, in the words of the rest of the report. A memorisation row's *advantage* is a rate above chance:
extraction's share of canaries recovered verbatim (a guess of a 10^12 secret has no chance); membership's
larger of TPR at 1 % FPR minus 0.01 (what a coin with that FPR gets) and 2·AUC − 1 (end by end); canary
exposure's share of the secret's bits revealed, exposure / space_bits, whose upper end is the largest upper end
or maximum over the repeat counts (so exposure ≥ 2 % of the bits is at least little, ≥ 10 % partial, ≥ half
most: conservative, since chance exposure is about 1.4 bits). Levels use the same bands on the upper end of the
95 % interval (``reports.verdict.level``). Exposure, in bits, also goes into the words ("a 10× canary has
exposure 24 bits of 40"). Server-side DP-SGD is said to protect against thieves and model users, never against the
server itself (which saw every activation).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd

from reports.markup import escape
from reports.tables import num
from reports.verdict import LEVELS, SAFE, level, signed_pct

VIEW_WORDS = {"server_adapters": ("the server's adapters", "memorise"),
              "colluder_model": ("a colluder's model (its head and tail with the server's trunk)", "memorises"),
              "released_model": ("the released model", "memorises")}
CHANCE_FPR = 0.01  # membership's advantage: TPR at 1 % FPR over what chance gets there


def memorisation_rows(df: pd.DataFrame) -> pd.Series:
    """A mask of the rows that are memorisation cells (they carry a ``memorisation`` breakdown)."""
    if "memorisation" not in df:
        return pd.Series(False, index=df.index)
    return df["memorisation"].map(lambda m: isinstance(m, dict)).astype(bool)  # bool even when empty: a mask


def _view(r: Any) -> str:
    m = r["memorisation"] if isinstance(r["memorisation"], dict) else {}
    return m.get("view") or "?"


def _triple(r: Any, name: str, f: Any) -> tuple[float | None, float | None, float | None]:
    v = num(r.get(name))
    lo, hi = num(r.get(f"{name}_lo")), num(r.get(f"{name}_hi"))
    return tuple(None if x is None else f(x) for x in (v, lo if lo is not None else v, hi if hi is not None else v))


def _exposure_bits(r: Any) -> tuple[float | None, float | None, float | None]:
    """The row's exposure (mean, lower, upper) in bits; the upper end is the largest of the row's upper end and
    every repeat count's upper end and maximum (one well-memorised canary is a leak)."""
    v, lo, hi = _triple(r, "exposure", float)
    tops = [x for x in [hi, *(num(b.get(k)) for b in _by_repeats(r, "exposure").values()
                              for k in ("exposure_hi", "exposure_max", "exposure"))] if x is not None]
    return v, lo, max(tops) if tops else None


def _advantage(r: Any) -> tuple[float | None, float | None, float | None]:
    """(advantage, lower, upper) of a memorisation row; see the module docstring for each attack's rule."""
    if r["attack"] == "extraction":
        return num(r.get("extracted")), num(r.get("extracted_lo")), num(r.get("extracted_hi"))
    if r["attack"] == "membership":
        tpr = _triple(r, "tpr_at_1pct_fpr", lambda x: x - CHANCE_FPR)
        auc = _triple(r, "auc", lambda x: 2 * x - 1)
        # the larger of the two, end by end: a high AUC with a low TPR at 1 % FPR still leaks
        return tuple(None if a is None and b is None else max(x for x in (a, b) if x is not None)
                     for a, b in zip(tpr, auc, strict=True))
    if r["attack"] == "canary_exposure":
        bits = num((r["memorisation"] if isinstance(r["memorisation"], dict) else {}).get("space_bits"))
        v, lo, hi = _exposure_bits(r)
        if not bits or hi is None:
            return None, None, None
        return tuple(None if x is None else max(0.0, x) / bits for x in (v, lo, hi))
    return None, None, None


def _measurable(r: Any) -> bool:
    """False for a membership row whose TPR at 1 % FPR rests on no false positive (fewer than 100
    non-members): that is TPR at zero FPR, which understates the attack, so it never reads as safe."""
    if r["attack"] != "membership":
        return True
    fp = ((r["memorisation"] if isinstance(r["memorisation"], dict) else {}).get("false_positives") or {})
    return (fp.get("fp_at_1pct_fpr") or 0) > 0


def _level(r: Any, hi: float | None) -> str:
    lvl = level(hi)
    return "unknown" if lvl in SAFE and not _measurable(r) else lvl


def _label(r: Any) -> str:
    lab = r.get("defense_label")
    return lab if isinstance(lab, str) else str(r.get("defense"))


def _setting(r: Any) -> tuple:
    return (r.get("model"), r.get("strategy"), r.get("finetune"), r.get("head_blocks"))


def _cost(r: Any, frame: pd.DataFrame) -> float | None:
    """Held-out perplexity increase of ``r``'s setting over the undefended row of the same setting."""
    same = frame[(frame["defense"] == "none") & (frame["attack"] == r["attack"]) & (frame["threat"] == r["threat"])]
    same = same[[_setting(x) == _setting(r) for _, x in same.iterrows()]]
    base = num(same["perplexity"].iloc[0]) if not same.empty and "perplexity" in same else None
    mine = num(r.get("perplexity"))
    return None if base in (None, 0) or mine is None else mine / base - 1


def _attack_key(r: Any) -> tuple[str, str]:
    return str(r["attack"]), _view(r)


def _cheapest(scored: list, worst: Any, frame: pd.DataFrame) -> tuple[str | None, float | None]:
    """The cheapest defended setting (defense label at one model / strategy / fine-tuning / split) where every
    attack the threat ran undefended at that setting, and the strongest undefended attack, also ran and each
    reads little or none. Never credits a defense measured at one setting for another."""
    groups: dict[tuple, list] = {}
    for sc in scored:
        if sc[0]["defense"] != "none":
            groups.setdefault((_setting(sc[0]), _label(sc[0])), []).append(sc)
    several = len({_setting(sc[0]) for sc in scored}) > 1
    found = []
    for (setting, label), mine in groups.items():
        need = {_attack_key(sc[0]) for sc in scored if sc[0]["defense"] == "none" and _setting(sc[0]) == setting}
        need.add(_attack_key(worst))
        if not need <= {_attack_key(sc[0]) for sc in mine}:
            continue
        if not all(_level(sc[0], sc[3]) in SAFE for sc in mine):
            continue
        costs = [c for c in (_cost(sc[0], frame) for sc in mine) if c is not None]
        cost = max(costs) if costs else None
        where = f" at {setting[1]}, {setting[2]}, k={setting[3]}" if several else ""
        found.append((math.inf if cost is None else cost, max(sc[3] for sc in mine), label + where, cost))
    if not found:
        return None, None
    _, _, label, cost = min(found)
    return label, cost


def _unknown(threat: str, attack: str, note: str) -> dict[str, Any]:
    return {"section": "memorisation", "threat": threat, "level": "unknown", "attack": attack, "advantage": None,
            "advantage_lo": None, "advantage_hi": None, "cheapest": None, "cheapest_cost": None,
            "note": note if len(note) <= 80 else note[:79] + "…"}


def verdict_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per threat (``threat_label``: one per model) for the page-1 verdict table: the strongest
    memorisation attack without a defense (largest upper end of its advantage interval), its level, and the
    cheapest defended setting that brings every attack of the threat at that setting to little or none
    (``cheapest``, with ``cheapest_cost`` the held-out perplexity increase), or None. A threat with no
    successful scored cell gets an "unknown" row. Keys: section, threat, level, attack, advantage,
    advantage_lo, advantage_hi, cheapest, cheapest_cost, note."""
    rows = frame[memorisation_rows(frame)] if not frame.empty else frame
    if rows.empty:
        return []
    labels = rows["threat_label"] if "threat_label" in rows else rows["threat"]
    out = []
    for threat, every in rows.groupby(labels.astype(str), sort=False):
        g = every[every["status"] == "ok"]
        failed = every[every["status"] != "ok"]
        note = "" if failed.empty else f"{len(failed)} cell(s) failed: {failed.iloc[0].get('error')}"
        if g.empty:
            out.append(_unknown(threat, "every cell failed", note))
            continue
        scored = [(r, *_advantage(r)) for _, r in g.iterrows()]
        scored = [sc for sc in scored if sc[3] is not None]
        if not scored:
            out.append(_unknown(threat, "no cell scored", note or "no advantage could be computed"))
            continue
        none = [sc for sc in scored if sc[0]["defense"] == "none"] or scored
        r, adv, lo, hi = max(none, key=lambda sc: (sc[3], sc[1] or 0))
        cheapest, cost = _cheapest(scored, r, rows[rows["status"] == "ok"])
        out.append({"section": "memorisation", "threat": threat, "level": _level(r, hi),
                    "attack": f"{r['attack']} on {_view(r)}", "advantage": adv, "advantage_lo": lo,
                    "advantage_hi": hi, "cheapest": cheapest, "cheapest_cost": cost, "note": note})
    return out


def _by_repeats(r: Any, key: str) -> dict[int, dict]:
    m = r["memorisation"] if isinstance(r["memorisation"], dict) else {}
    by = m.get("by_repeats") or {}
    return {int(k): v for k, v in by.items() if key in v}


def view_sentences(frame: pd.DataFrame) -> list[str]:
    """Per view and training setting, undefended: 'the server's adapters memorise: a 10× canary is extracted'
    (the fewest repeats at which a canary came out verbatim), else the highest exposure a canary reached,
    plus membership's rate at low FPR and how many false positives it rests on."""
    rows = frame[memorisation_rows(frame) & (frame["status"] == "ok") & (frame["defense"] == "none")]
    out = []
    keys = sorted({(_view(r), str(r.get("strategy")), str(r.get("finetune"))) for _, r in rows.iterrows()},
                  key=lambda k: (list(VIEW_WORDS).index(k[0]) if k[0] in VIEW_WORDS else 9, k[1], k[2]))
    several = len({k[1:] for k in keys}) > 1
    for view, strategy, finetune in keys:
        g = rows[[(_view(r), str(r.get("strategy")), str(r.get("finetune"))) == (view, strategy, finetune)
                  for _, r in rows.iterrows()]]
        words, verb = VIEW_WORDS.get(view, (view, "memorises"))
        where = f" ({strategy}, {finetune} fine-tuning)" if several else ""
        extracted = sorted({k for _, r in g[g["attack"] == "extraction"].iterrows()
                            for k, v in _by_repeats(r, "extracted").items() if (num(v.get("extracted_max")) or 0) > 0})
        exposures = [(k, num(v.get("exposure")), num(v.get("exposure_max")), num((r["memorisation"] or {})
                      .get("space_bits"))) for _, r in g[g["attack"] == "canary_exposure"].iterrows()
                     for k, v in _by_repeats(r, "exposure").items()]
        parts = []
        if extracted:
            parts.append(f"{words}{where} {verb}: a {extracted[0]}× canary is extracted")
        else:
            high = [x for x in exposures if x[2] is not None and x[3] and x[2] >= 0.5 * x[3]]
            if high:
                r, _, top, bits = min(high)
                parts.append(f"{words}{where} {verb}: a {r}× canary reaches {top:.0f} bits of exposure (of "
                             f"{bits:.0f}), though none is extracted")
            else:
                parts.append(f"{words}{where}: no canary extracted")
        if exposures:
            top = max(exposures, key=lambda x: (x[0], x[1] or 0))
            if top[1] is not None and top[3]:
                parts.append(f"{top[0]}× canaries have mean exposure {top[1]:.1f} bits of {top[3]:.1f}")
        for _, r in g[g["attack"] == "membership"].iterrows():
            m = r["memorisation"] or {}
            fp = (m.get("false_positives") or {}).get("fp_at_0_1pct_fpr")
            low = (f"TPR {100 * (num(r.get('tpr_at_0_1pct_fpr')) or 0):.1f} % at 0.1 % FPR, resting on {fp} false "
                   f"positive{'s' if fp != 1 else ''}" if fp else
                   f"TPR {100 * (num(r.get('tpr_at_1pct_fpr')) or 0):.1f} % at 1 % FPR (0.1 % FPR is not measurable "
                   f"with {m.get('non_members')} non-members)")
            parts.append(f"membership ({m.get('signal')}) reaches AUC {num(r.get('auc')):.2f} and {low}")
        out.append("; ".join(parts) + ".")
    return out


ALL_VIEWS = ("server_adapters", "colluder_model", "released_model")  # the memorisation views, in report order


def dp_covers(report: Any, view: str) -> bool:
    """Whether a dp_sgd ``report`` (its ``defense_report``) bounds what ``view`` says about a record: every
    weight of that view trained under DP-SGD. Only then is its ε a guarantee for that row."""
    if not isinstance(report, dict):
        return False
    views = report.get("covers_views")
    if views is None:  # written before the report said: only "both" is known to cover every view
        return report.get("target") == "both"
    return view in views


def dp_sentences(frame: pd.DataFrame) -> list[str]:
    rows = frame[memorisation_rows(frame) & (frame["defense"] == "dp_sgd")]
    if rows.empty:
        return []
    out = []
    reports = [r["defense_report"] for _, r in rows.iterrows() if isinstance(r["defense_report"], dict)]
    views_words = {"server_adapters": "the server's adapters", "colluder_model": "a colluder's model",
                   "released_model": "the released model"}
    for target in sorted({rep.get("target", "server") for rep in reports}):
        mine = [rep for rep in reports if rep.get("target", "server") == target]
        eps = sorted({round(e, 2) for e in (num(rep.get("epsilon")) for rep in mine) if e is not None})
        covered = sorted({v for rep in mine for v in ALL_VIEWS if dp_covers(rep, v)}, key=ALL_VIEWS.index)
        if covered:
            bound = "It bounds what a record leaves in " + ", ".join(views_words[v] for v in covered)
            if len(covered) < len(ALL_VIEWS):
                bound += "; not in " + ", ".join(views_words[v] for v in ALL_VIEWS if v not in covered)
        else:
            other = "clients' heads and tails" if target == "server" else "server's adapters"
            bound = (f"It bounds nothing here: the {other} trained on the records without DP, and every record's "
                     "gradient flows through them (target = \"both\", or the other side frozen, gives a guarantee)")
        out.append(f"dp_sgd (target = {target}) was measured at ε = {', '.join(map(str, eps)) or 'n/a'}. {bound}. "
                   "It does not protect against the server itself, which saw every activation and gradient in clear "
                   "while training.")
    return out


def exposure_png(frame: pd.DataFrame) -> bytes | None:
    """Mean exposure against repeats, one line per (view, defense setting); and ROC curves, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frame[memorisation_rows(frame) & (frame["status"] == "ok")]
    exp = rows[rows["attack"] == "canary_exposure"]
    mem = rows[rows["attack"] == "membership"]
    if exp.empty and mem.empty:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for _, r in exp.iterrows():
        by = sorted(_by_repeats(r, "exposure").items())
        xs = [k for k, _ in by]
        ys = [num(v["exposure"]) for _, v in by]
        err = [[y - (num(v.get("exposure_lo")) or y) for (_, v), y in zip(by, ys, strict=True)],
               [(num(v.get("exposure_hi")) or y) - y for (_, v), y in zip(by, ys, strict=True)]]
        a.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{_view(r)} / {r['strategy']} / {_label(r)}")
    a.set_xscale("log")
    a.set_xlabel("canary repeats")
    a.set_ylabel("exposure (bits)")
    a.set_title("Exposure against repeats")
    if not exp.empty:
        a.legend(fontsize=6)
    for _, r in mem.iterrows():
        roc = (r["memorisation"] or {}).get("roc") or {}
        f, t = roc.get("fpr") or [], roc.get("tpr") or []
        pts = [(x, y) for x, y in zip(f, t, strict=True) if x > 0 and y > 0]
        if pts:
            b.plot(*zip(*pts, strict=True), label=f"{_view(r)} / {r['strategy']} / {_label(r)}")
    b.plot([1e-4, 1], [1e-4, 1], "k--", lw=0.8, label="chance")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("false-positive rate")
    b.set_ylabel("true-positive rate")
    b.set_title("Membership ROC (log-log)")
    b.legend(fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ci(r: Any, name: str, pct: bool = False) -> str:
    v, lo, hi = (num(r.get(f"{name}{s}")) for s in ("", "_lo", "_hi"))
    if v is None:
        return "–"
    def f(x: float) -> str:
        return f"{100 * x:.1f}%" if pct else f"{x:.2f}"

    return f(v) + (f" [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else "")


def section(frame: pd.DataFrame, title: str = "Memorisation: what the adapters and the released model remember"
            ) -> list:
    """The section's flowables (empty when the store has no memorisation rows)."""
    from reports.pdf import LANDSCAPE_W, image, para, table, text

    rows = frame[memorisation_rows(frame)]
    if rows.empty:
        return []
    out = [para(escape(title), "h1")]
    for s in [*view_sentences(rows), *dp_sentences(rows)]:
        out.append(para(escape(s), "verdict"))
    for v in verdict_rows(rows):
        adv = "–" if v["advantage"] is None else f"{v['advantage']:.3f}"
        cheap = (f"; cheapest defended setting at little or none: {v['cheapest']} "
                 f"({signed_pct(v['cheapest_cost'])} held-out perplexity)" if v["cheapest"] else "")
        out.append(para(escape(f"{v['threat']}: {v['attack']} is {v['level']} (advantage {adv}, upper "
                               f"{'–' if v['advantage_hi'] is None else format(v['advantage_hi'], '.3f')}){cheap}."),
                        "verdict"))
    head = ["threat / view", "strategy, finetune", "defense", "attack", "exposure (bits) or extracted by repeats",
            "AUC", "TPR @ 1 % FPR", "TPR @ 0.1 % FPR (FP it rests on)", "ε", "held-out perplexity"]
    body = [[text(h, "head") for h in head]]
    for _, r in rows.sort_values(["threat", "attack", "defense"]).iterrows():
        m = r["memorisation"] if isinstance(r["memorisation"], dict) else {}
        key = "exposure" if r["attack"] == "canary_exposure" else "extracted"
        by = ", ".join(f"{k}×: {num(v.get(key)):.2f}" for k, v in sorted(_by_repeats(r, key).items())
                       if num(v.get(key)) is not None)
        fp = (m.get("false_positives") or {}).get("fp_at_0_1pct_fpr")
        rep = r["defense_report"] if isinstance(r["defense_report"], dict) else {}
        eps = num(rep.get("epsilon")) if dp_covers(rep, m.get("view", "?")) else None  # ε only where it holds
        status = "" if r["status"] == "ok" else f" FAILED: {r.get('error')}"
        body.append([text(f"{r['threat']} / {m.get('view', '?')}"), text(f"{r['strategy']}, {r['finetune']}"),
                     text(_label(r)), text(f"{r['attack']}{status}"), text(by or "–"), text(_ci(r, "auc")),
                     text(_ci(r, "tpr_at_1pct_fpr", True)),
                     text(_ci(r, "tpr_at_0_1pct_fpr", True) + ("" if fp is None else f" ({fp} FP)")),
                     text("–" if eps is None else f"{eps:.2f}"),
                     text("–" if num(r.get("perplexity")) is None else f"{num(r.get('perplexity')):.1f}")])
    widths = [w * LANDSCAPE_W for w in (0.12, 0.08, 0.11, 0.09, 0.19, 0.1, 0.1, 0.11, 0.04, 0.06)]
    out.append(table(body, widths))
    png = exposure_png(rows)
    if png is not None:
        out.append(image(png, LANDSCAPE_W * 0.9, 300))
    out.append(para(escape("Exposure = log2(secret space) − log2(rank), estimated from ≥ 10^4 sampled candidates with "
                           "a skew-normal fit (Carlini et al.). Members: the canary victim's training records; "
                           "non-members: held-out records of the same kind. Levels: " + ", ".join(LEVELS) + "."),
                    "caption"))
    return out
