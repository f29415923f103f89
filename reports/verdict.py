"""Plain-language verdicts: how much each threat recovers, and what each defense changes.

The rule is on the strongest attack's token accuracy (fraction of the private tokens recovered):
``>= 0.5`` "leaks", ``0.1 - 0.5`` "partial", ``< 0.1`` "little". A defense "does not help" when it leaves
the strongest attack within ``SAME`` of the undefended token accuracy, "stops it" when it brings a leaking or
partial threat down to little, and "reduces it" otherwise. Returned strings are plain text (not markup).
"""

from __future__ import annotations

from typing import Any

from reports.tables import num

LEAKS, PARTIAL = 0.5, 0.1
SAME = 0.05  # token-accuracy difference below which a defense counts as no change
RULE = (f"Rule: the strongest attack's token accuracy (share of private tokens recovered) ≥ {LEAKS:g} = leaks; "
        f"{PARTIAL:g}–{LEAKS:g} = partial; < {PARTIAL:g} = little. A defense 'does not help' if it changes that "
        f"by less than {SAME:g}, 'stops it' if it brings it down to little. Percentages after a defense are the "
        "tokens still recovered under it.")


def level(token_accuracy: float | None) -> str:
    if token_accuracy is None:
        return "unknown"
    if token_accuracy >= LEAKS:
        return "leaks"
    return "partial" if token_accuracy >= PARTIAL else "little"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _leak_phrase(best: Any) -> str:
    acc = num(best["token_accuracy"])
    pii = num(best["pii_recovery"])
    extra = f", {pct(pii)} of PII fields" if pii is not None else ""
    return (f"{best['attack_label']} recovers {pct(acc)} of tokens at {best['split']} "
            f"(BLEU-4 {num(best['bleu4']) or 0:.1f}, ROUGE-1 {num(best['rouge1']) or 0:.1f}{extra})")


def _failed_phrase(entry: dict[str, Any], limit: int = 120) -> str:
    err = entry["error"] or "no error recorded"
    err = err if len(err) <= limit else err[: limit - 1] + "…"
    cells = "the only cell" if entry["n"] == 1 else f"all {entry['n']} cells"
    return f"{cells} failed ({err})"


def defense_effect(base: float | None, defended: float | None) -> str:
    """How a defense changed the strongest attack's token accuracy: "stops it", "reduces it to partial"
    (or "… to little" when the threat was already little), or "does not help"."""
    if base is None or defended is None or abs(defended - base) < SAME or defended > base:
        return "does not help"
    if level(defended) == "little" and level(base) != "little":
        return "stops it"
    return f"reduces it to {level(defended)}"


def threat_verdict(entries: list[dict[str, Any]]) -> tuple[str, str]:
    """(level, sentence) for one threat from its ``tables.verdict_cells`` entries (no defense first).

    The level is that of the undefended strongest attack; "unknown" when every undefended cell failed; the
    worst defended one when the run has no undefended cell. Defenses are grouped by their effect: "Stops it: dxp(eta=10) (0% of tokens). Does not
    help: encryption (100%)."
    """
    threat = entries[0]["threat"]
    base = next((e for e in entries if e["is_none"]), None)
    base_acc = num(base["best"]["token_accuracy"]) if base is not None and base["best"] is not None else None
    if base_acc is not None:
        head = level(base_acc)
        parts = [f"{threat}: without a defense, {_leak_phrase(base['best'])}."]
        if len(base["by_split"]) > 1:
            parts.append("By split: " + ", ".join(f"{s} {pct(v)}" for s, v in base["by_split"].items()) + ".")
    else:
        parts = [f"{threat}: without a defense, {_failed_phrase(base)}." if base is not None
                 else f"{threat}: no cell ran without a defense."]
        accs = [num(e["best"]["token_accuracy"]) for e in entries if e["best"] is not None]
        head = "unknown" if base is not None else level(max((a for a in accs if a is not None), default=None))
    groups: dict[str, list[str]] = {}
    for e in entries:
        if e is base:
            continue
        if e["best"] is None:
            parts.append(f"With {e['defense']}, {_failed_phrase(e)}.")
        elif base_acc is None:
            parts.append(f"With {e['defense']}, {_leak_phrase(e['best'])}.")
        else:
            acc = num(e["best"]["token_accuracy"])
            groups.setdefault(defense_effect(base_acc, acc), []).append(f"{e['defense']} ({pct(acc)})")
    rank = {"stops it": 0, "does not help": 2}
    for effect in sorted(groups, key=lambda g: (rank.get(g, 1), g)):
        parts.append(f"{effect[0].upper()}{effect[1:]}: {', '.join(groups[effect])}.")
    return head, " ".join(parts)
