"""The plain-text table `splitleak results` prints: one line per row of the results store."""

from __future__ import annotations

from typing import Any

from suite.experiment.store import METRICS


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the store (what `splitleak results` prints)."""
    head = ["k", "threat", "attack", "defense", *METRICS, "utility", "secs", "status"]
    lines = [head]
    for r in rows:
        def fmt(v, digits=3):
            return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

        d = r["defense"] if r["defense_params"] in (None, "{}") else f"{r['defense']}{r['defense_params']}"
        lines.append([str(r["head_blocks"]), r["threat"], r["attack"], d,
                      *(fmt(r[m], 2 if m.startswith(("bleu", "rouge")) else 3) for m in METRICS),
                      fmt(r["utility"]), fmt(r["attack_seconds"], 1),
                      r["status"] if r["status"] == "ok" else f"failed: {r['error']}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in lines)
