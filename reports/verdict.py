"""The verdict: page 1's table (``VerdictRow``, one row per threat and section) and the plain-language verdicts
per threat, from ``frontier.settings`` (one row per threat, defense setting and split).

Page 1 schema. Every section of the report that judges a threat (training here; pipelines, inference and
memorisation add theirs) contributes rows of one shape, ``VerdictRow``:

    section        which part of the system the row judges: "training", "pipelines", "inference", …
    threat         the threat's label (a preset name, prefixed by the model when a store holds several)
    level          none | little | partial | most | unknown: the leakage without a defense (worst split)
    attack         the strongest attack there, with where it ran ("prefix_inversion at k=2")
    advantage      its leakage as advantage over the blind baseline (raw token accuracy where the store has
    advantage_lo   no blind baseline: ``note`` says so), with the 95 % interval
    advantage_hi
    cheapest       the cheapest tested setting that brings every attack of the threat to little or none
                   ("dxp (eta=720) at k=1"), or None: the table prints "none tested"
    cheapest_cost  its cost, the relative increase of held-out perplexity (0.12 = +12 %), and optionally
                   ``cheapest_cost_lo`` / ``cheapest_cost_hi``, its interval
    not_addressed  defenses that do not address the threat (encryption against the server, who decrypts)
    note           optional: one short caveat printed under the row's cheapest setting

A section adds one provider to ``reports.report.PAGE_ONE`` (the list lives there, above the section modules,
which import this one): a function from the report's frame (``tables.prepare`` of the store) to a list of
``VerdictRow``; a section exposing ``verdict_rows(frame) -> list[dict]`` with the keys above is wrapped by
``from_dicts``. ``verdict_rows`` gathers every provider's rows for page 1 (``PROVIDERS``, training's alone, when
none are given).

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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from reports.frontier import settings as frontier_settings
from reports.tables import num, threat_order
from suite.interfaces.presets import THREATS, Capability

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


# -- page 1: one table, one schema --------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictRow:
    """One row of page 1's verdict table (module docstring: the schema)."""

    section: str
    threat: str
    level: str
    attack: str
    advantage: float | None
    advantage_lo: float | None
    advantage_hi: float | None
    cheapest: str | None
    cheapest_cost: float | str | None  # a perplexity change, or a section's own wording (inference: answer ROUGE-L)
    not_addressed: tuple[str, ...] = ()
    cheapest_cost_lo: float | None = None
    cheapest_cost_hi: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # provider-specific, not printed

    def __post_init__(self) -> None:
        if not self.section or not self.threat:
            raise ValueError("a verdict row needs a section and a threat (e.g. section='training')")
        if self.level not in (*LEVELS, "unknown"):
            raise ValueError(f"verdict row level {self.level!r} is not one of {', '.join(LEVELS)}, unknown")
        object.__setattr__(self, "not_addressed", tuple(self.not_addressed or ()))


Provider = Callable[[pd.DataFrame], list[VerdictRow]]


def from_dicts(rows: Iterable[dict[str, Any]]) -> list[VerdictRow]:
    """``VerdictRow``s from a section's ``verdict_rows(frame)`` dicts (the keys of the schema)."""
    return [VerdictRow(**d) for d in rows]


# What a threat observes of the traffic, and what a defense's report says it protects (``protects``: e.g.
# encryption protects only the wire): a defense protecting none of what the threat observes does not address it.
OBSERVES = (Capability.WIRE, Capability.ACTIVATIONS, Capability.GRADIENTS)


def not_addressing(frame: pd.DataFrame, threat: str) -> list[str]:
    """Defense names whose reports say they protect none of what ``threat`` (a preset name) observes."""
    preset = THREATS.get(threat)
    if preset is None or "defense_report" not in frame:
        return []
    sees = {c.value for c in OBSERVES if c in preset.grants}
    out = set()
    for name, rep in zip(frame["defense"], frame["defense_report"], strict=True):
        protects = rep.get("protects") if isinstance(rep, dict) else None
        if isinstance(protects, list | tuple) and sees and not sees & set(protects):
            out.add(str(name))
    return sorted(out)


def _verified(s: pd.DataFrame, strongest: str | None) -> pd.DataFrame:
    """The settings the threat's strongest undefended attack also ran against (a setting only checked by
    weaker attacks is never called sufficient)."""
    if strongest is None:
        return s
    return s[[strongest in a for a in s["attacks"]]]


def training_rows(frame: pd.DataFrame) -> list[VerdictRow]:
    """Page 1 rows of the split-training matrix: one per threat."""
    if frame.empty:
        return []
    if "mode" in frame:  # other sections' cells (inference) are theirs to judge
        frame = frame[frame["mode"].fillna("training").eq("training")]
    if "stages" in frame:  # and pipelines' (S > 1 stages: reports.pipeline)
        frame = frame[pd.to_numeric(frame["stages"], errors="coerce").fillna(1).le(1)]
    if frame.empty:
        return []
    st = frontier_settings(frame)
    out = []
    for threat in threat_order(frame, list(THREATS)):
        cells = frame[frame["threat_label"] == threat]
        name = str(cells["threat"].iloc[0])
        idle = not_addressing(cells, name)
        mine = st[(st["threat_label"] == threat) & ~st["defense"].isin(idle)]
        if mine.empty:
            failed = cells[~cells["ok"]]
            err = str(failed.iloc[0]["error"]) if not failed.empty else "no finished cell"
            out.append(VerdictRow("training", threat, "unknown", "every cell failed", None, None, None, None, None,
                                  tuple(idle), note=err if len(err) <= 80 else err[:79] + "…"))
            continue
        none = mine[mine["is_none"]]
        ref = none if not none.empty else mine
        # ties go to the deepest split: "it leaks even there" is the statement a deployer needs
        worst = ref.sort_values(["leak_hi", "leak", "head_blocks"], ascending=False).iloc[0]
        note = "" if worst["kind"] == "advantage" else "raw token accuracy: no blind baseline in this store"
        strongest = str(worst["attack"]) if not none.empty else None
        best = cheapest(_verified(mine, strongest))
        if best is None and cheapest(mine) is not None:
            weak = cheapest(mine)
            note = (f"{weak['defense_label']} at {weak['split']} reaches little only against weaker attacks: "
                    f"{strongest} did not run there")
        out.append(VerdictRow(
            "training", threat, level(num(worst["leak_hi"])), f"{worst['attack_label']} at {worst['split']}",
            num(worst["leak"]), num(worst["leak_lo"]), num(worst["leak_hi"]),
            None if best is None else ("no defense" if best["is_none"] else best["defense_label"])
            + f" at {best['split']}" + (f" ({best['guarantee']})" if best["guarantee"] else ""),
            None if best is None else num(best["cost"]), tuple(idle),
            None if best is None else num(best["cost_lo"]), None if best is None else num(best["cost_hi"]),
            note, {"settings": mine}))
    return out


PROVIDERS: list[Provider] = [training_rows]


def verdict_rows(frame: pd.DataFrame, providers: Iterable[Provider] | None = None) -> list[VerdictRow]:
    """Every section's page-1 rows, in the order of ``PROVIDERS``."""
    return [row for provider in (PROVIDERS if providers is None else providers) for row in provider(frame)]


def cost_text(v: float | str | None, lo: float | None = None, hi: float | None = None) -> str:
    if v is None:
        return "cost not measured"
    if isinstance(v, str):  # a section's own wording (inference: the answer's ROUGE-L)
        return v
    return signed_pct(v) + (f" [{signed_pct(lo)}, {signed_pct(hi)}]" if lo is not None and hi is not None else "")


def advantage_text(r: VerdictRow) -> str:
    if r.advantage is None:
        return "–"
    ci = (f" [{r.advantage_lo:.2f}, {r.advantage_hi:.2f}]" if r.advantage_lo is not None
          and r.advantage_hi is not None and r.advantage_lo != r.advantage_hi else "")
    return f"{r.advantage:.2f}{ci}"


def cheapest_text(r: VerdictRow) -> str:
    if r.cheapest is None:
        return "none tested"
    if isinstance(r.cheapest_cost, str):
        return f"{r.cheapest}: {r.cheapest_cost}"
    return f"{r.cheapest}: {cost_text(r.cheapest_cost, r.cheapest_cost_lo, r.cheapest_cost_hi)} perplexity"


MAX_SENTENCES = 3


def key_sentences(rows: list[VerdictRow], st: pd.DataFrame, budget: str = "") -> list[str]:
    """At most three sentences of what matters most: whether depth protects, which threats no tested setting
    stops, and the defenses that did not act at this budget (``budget``: e.g. '6 training steps')."""
    out = []
    none = st[st["is_none"]] if not st.empty else st
    if not none.empty and none["head_blocks"].nunique() > 1:
        by_k = (none.sort_values(["raw", "leak_hi"], ascending=False).drop_duplicates("head_blocks")
                    .sort_values("head_blocks"))
        w = by_k.iloc[-1]  # the deepest split's strongest attack
        k = w["head_blocks"]
        parts = (" / ".join(f"{num(r['raw']):.2f}" for _, r in by_k.iterrows()) + " of the tokens at "
                 + " / ".join(by_k["split"]))
        if still_leaks(num(w["leak_lo"])):
            out.append(f"Depth does not protect: without a defense the strongest attack recovers {parts}; at "
                       f"k={k} {w['attack_label']} still reaches {level(num(w['leak_hi']))} ({w['threat_label']}, "
                       f"advantage {num(w['leak']):.2f}).")
        else:
            out.append(f"Without a defense the strongest attack recovers {parts}: at k={k} the whole interval of "
                       f"its advantage is no longer above little.")
    open_threats = [r.threat for r in rows if r.cheapest is None and r.level not in SAFE]
    stopped = [f"{r.threat} by {r.cheapest} ({cost_text(r.cheapest_cost)})" for r in rows if r.cheapest is not None]
    if open_threats or stopped:
        words = []
        if open_threats:
            words.append(f"no tested setting brings {', '.join(dict.fromkeys(open_threats))} to little")
        if stopped:
            words.append("stopped: " + "; ".join(stopped))
        sentence = "; ".join(words) + "."
        out.append(sentence[0].upper() + sentence[1:])
    idle = st[(~st["is_none"]) & (st["acted"] == False)] if not st.empty else st  # noqa: E712
    if not idle.empty:
        labels = list(dict.fromkeys(idle.sort_values("head_blocks")["defense_label"]))
        notes = [n for n in idle["act_note"] if n]
        out.append(f"{', '.join(labels)} did not act at this budget" + (f" of {budget}" if budget else "")
                   + (f" ({notes[0]})" if notes else "")
                   + ": this run cannot tell whether it helps; see section 4.")
    return out[:MAX_SENTENCES]
