"""Plain-language verdicts per threat, from ``frontier.settings`` (one row per threat, defense setting and split).

Leakage of a threat is its strongest attack over everything it sees (every attack it ran, adaptive or not),
measured as token accuracy's advantage over the blind baseline where the store has it (else the raw token
accuracy, and the sentence says so). Levels are set on the *upper end* of the 95 % interval, so a setting only
reads "little" when the whole interval is below the band:

    upper bound < 0.02  none    < 0.10  little    < 0.50  partial    otherwise  most

A split "still leaks" when the interval's lower end is at or above ``LITTLE``. The verdict names the cheapest
tested setting (least held-out perplexity increase over the undefended cell of the same split) that reaches
little, per defense and overall, or says that none does. A setting whose mechanism did not measurably act is
said to have not acted at this budget, never that the defense "does not help". Strings are plain text.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from reports.tables import num

NONE, LITTLE, MOST = 0.02, 0.10, 0.50
LEVELS = ("none", "little", "partial", "most")
SAFE = ("none", "little")
RULE = (f"Rule: leakage is the strongest attack's token accuracy over every attack the threat ran, as advantage "
        f"over the blind baseline (an attacker that sees nothing) where measured. Levels are set on the upper end "
        f"of its 95 % interval: < {NONE:g} none; < {LITTLE:g} little; < {MOST:g} partial; otherwise most. A split "
        f"still leaks when the interval's lower end is ≥ {LITTLE:g}. Cost = increase of held-out perplexity "
        "over the undefended model at the same split.")


def level(upper: float | None) -> str:
    """The level of a leakage whose 95 % interval reaches up to ``upper``."""
    if upper is None:
        return "unknown"
    if upper < NONE:
        return "none"
    if upper < LITTLE:
        return "little"
    return "partial" if upper < MOST else "most"


def still_leaks(lower: float | None) -> bool:
    """The whole interval is above the 'little' band."""
    return lower is not None and lower >= LITTLE


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def signed_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f} %"


def leak_phrase(r: Any) -> str:
    """'advantage 0.03 [0.01, 0.05]' or 'token accuracy 0.40 [0.31, 0.50] (no blind baseline)'."""
    lo, hi, v = num(r["leak_lo"]), num(r["leak_hi"]), num(r["leak"])
    interval = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and lo != hi else ""
    if r["kind"] == "advantage":
        return f"advantage {v:.2f}{interval}"
    return f"token accuracy {v:.2f}{interval}, no blind baseline"


def cost_phrase(r: Any) -> str:
    cost = num(r["cost"])
    if cost is None:
        return "an unmeasured utility cost"
    lo, hi = num(r["cost_lo"]), num(r["cost_hi"])
    interval = f" [{signed_pct(lo)}, {signed_pct(hi)}]" if lo is not None and hi is not None else ""
    central = num(r["cost_central"])
    vs = f" ({signed_pct(central)} vs centralised)" if central is not None else ""
    return f"{signed_pct(cost)} held-out perplexity{interval}{vs}"


def _attack(r: Any) -> str:
    mode = {True: " (adaptive)", False: " (non-adaptive)"}.get(r["adaptive"], "")
    return f"{r['attack_label']}{mode}"


def setting_phrase(r: Any, also: list[str] | None = None) -> str:
    """'dxp (eta=30) at k=1 brings every attack to little (advantage 0.03 [0.01, 0.05]) at +12 % …'; ``also``:
    other splits where the same setting reaches little."""
    lvl = level(num(r["leak_hi"]))
    more = f" (also at {', '.join(also)})" if also else ""
    if r["is_none"]:
        return f"no defense at {r['split']}{more} is already {lvl} ({leak_phrase(r)})"
    return (f"{r['defense_label']} at {r['split']}{more} brings every attack to {lvl} ({leak_phrase(r)}) at "
            f"{cost_phrase(r)}")


def _rank(levels: pd.Series) -> pd.Series:
    return levels.map({lv: i for i, lv in enumerate(LEVELS)}).fillna(-1)


def _reaching(s: pd.DataFrame) -> pd.DataFrame:
    safe = pd.Series([level(num(h)) in SAFE for h in s["leak_hi"]], index=s.index, dtype=bool)
    return s[safe & (s["acted"] != False)]  # noqa: E712 (None: cannot tell, kept)


def cheapest(s: pd.DataFrame) -> pd.Series | None:
    """The cheapest setting of ``s`` that reaches little or none and acted (least cost, then least leakage,
    then the shallowest split)."""
    ok = _reaching(s)
    if ok.empty:
        return None
    ok = ok.assign(_c=ok["cost"].astype(float).fillna(float("inf")), _h=ok["leak_hi"].astype(float))
    return ok.sort_values(["_c", "_h", "head_blocks"], kind="stable").iloc[0]


def cheapest_phrase(s: pd.DataFrame) -> str | None:
    best = cheapest(s)
    if best is None:
        return None
    ok = _reaching(s)
    also = ok[(ok["defense_label"] == best["defense_label"]) & (ok["head_blocks"] != best["head_blocks"])]
    return setting_phrase(best, list(also.sort_values("head_blocks")["split"]))


def threat_verdict(s: pd.DataFrame) -> tuple[str, list[str]]:
    """(level, sentences) for one threat from its ``frontier.settings`` rows.

    The level is the undefended one at the worst split (the worst setting when nothing ran undefended)."""
    threat = s["threat_label"].iloc[0]
    s = s.assign(level=[level(num(h)) for h in s["leak_hi"]])
    none = s[s["is_none"]]
    ref = none if not none.empty else s
    worst = ref.sort_values(["leak_hi", "leak"], ascending=False).iloc[0]
    head = worst["level"]
    if none.empty:
        out = [f"{threat}: no cell ran without a defense; the worst setting, {worst['defense_label']} at "
               f"{worst['split']}, is {head}: {_attack(worst)} reaches {leak_phrase(worst)}."]
    else:
        blind = f"; blind alone {pct(num(worst['blind']))}" if num(worst["blind"]) is not None else ""
        out = [f"{threat}: without a defense, the strongest of its attacks, {_attack(worst)}, reaches {head} at "
               f"{worst['split']} ({leak_phrase(worst)}; {pct(num(worst['raw']))} of tokens{blind})."]
        if none["split"].nunique() > 1:
            out.append("By split: " + ", ".join(f"{r['split']} {r['level']}" for _, r in
                                                none.sort_values("head_blocks").iterrows()) + ".")
    overall = cheapest_phrase(s)
    if overall is not None:
        out.append(f"Cheapest tested setting that reaches little or none: {overall}.")
    else:
        floor = LEVELS[int(_rank(s["level"]).min())] if (_rank(s["level"]) >= 0).any() else "unknown"
        out.append(f"No tested setting brings {threat} below {floor}.")
    for name in sorted(set(s.loc[~s["is_none"], "defense"])):
        mine = s[s["defense"] == name]
        idle = mine[mine["acted"] == False]  # noqa: E712
        active = mine[mine["acted"] != False]  # noqa: E712
        pick = cheapest_phrase(active)
        if pick is not None:
            if pick != overall:
                out.append(f"With {name}: {pick}.")
        elif not active.empty:
            lowest = LEVELS[int(_rank(active["level"]).min())] if (_rank(active["level"]) >= 0).any() else "unknown"
            out.append(f"No tested setting of {name} brings {threat} below {lowest}.")
        for label, g in idle.groupby("defense_label", sort=True):
            splits = ", ".join(g.sort_values("head_blocks")["split"])
            note = next((n for n in g["act_note"] if n), "")
            out.append(f"{label} did not act at this budget at {splits}" + (f" ({note})" if note else "")
                       + f": this run cannot tell whether {name} helps against {threat}.")
    return head, out
