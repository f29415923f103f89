"""Pooling a cell's seeds: once every seed of a cell has its row, the aggregate row holds the metrics,
intervals and advantages over records x seeds (``[matrix] seeds``; docs/config.md "Sweeps, training axes and seeds")."""

from __future__ import annotations

import json

import numpy as np

from suite.experiment.config import ExperimentConfig
from suite.experiment.inference_run import pooled_parts
from suite.experiment.memorisation import pooled_fields
from suite.experiment.plan import Cell, aggregate_key, cell_key, cell_row
from suite.experiment.store import MEMORISATION_METRICS, METRICS, ResultsStore
from suite.scoring.intervals import from_json, summarize, utility_summary


def aggregate_seeds(cfg: ExperimentConfig, out: str, cells: list[Cell], revision: str,
                    code: str | None = None) -> int:
    """For every cell whose seeds have all finished, (re)write its aggregate row: metrics, intervals and
    advantages over records x seeds from the per-seed rows' ``record_scores``. Returns how many."""
    if len(cfg.matrix.seeds or ()) < 2:
        return 0
    members: dict[Cell, list[Cell]] = {}
    for c in cells:
        members.setdefault(c.without_seed(), []).append(c)
    written = 0
    with ResultsStore(out) as store:
        rows = {r["key"]: r for r in store.rows(per_seed=True)}
        for cell, seeded in members.items():
            mine = [rows.get(cell_key(c, cfg, revision, code)) for c in seeded]
            if any(r is None for r in mine):
                continue
            key = aggregate_key(seeded[0], cfg, revision, code)
            row = cell_row(cell, key, cfg, revision)
            seeds = [r["seed"] for r in mine]
            row.update(seed=None, seeds=seeds, aggregate_key=None, defense_report=mine[0]["defense_report"],
                       samples=mine[0]["samples"], attack_seconds=sum(r["attack_seconds"] or 0 for r in mine),
                       attack_peak_rss_mib=max(r["attack_peak_rss_mib"] or 0 for r in mine))
            failed = [r for r in mine if r["status"] != "ok"]
            scores = [None if r["record_scores"] is None else json.loads(r["record_scores"]) for r in mine]
            if failed:
                row.update(status="failed", error=f"seed {failed[0]['seed']} failed: {failed[0]['error']}")
            elif any(s is None for s in scores):  # rows of an older version: means only
                row.update({m: float(np.mean([r[m] for r in mine])) if all(r[m] is not None for r in mine) else None
                            for m in (*METRICS, *MEMORISATION_METRICS, "utility")}, status="ok", error=None,
                           note=f"mean over seeds {seeds} (no per-record scores: no intervals)")
            elif all("memorisation" in s for s in scores):  # memorisation rows: canaries and members
                row.update(pooled_fields(mine, scores), status="ok", error=None,
                           utility=float(np.mean([r["utility"] for r in mine])),
                           note=f"mean over records x seeds {seeds}")
            else:
                stats = [from_json(s["stats"]) for s in scores]
                blind = [from_json(s["blind"]) for s in scores] if all("blind" in s for s in scores) else None
                row.update(summarize(stats, blind), status="ok", error=None,
                           note=f"mean over records x seeds {seeds}")
                row.update(pooled_parts(scores))  # inference rows: the prompt's and the response's columns
                for col in ("mode", "answer_rougeL", "seconds_per_token", "bytes_per_token"):
                    if col in mine[0] and mine[0][col] is not None:
                        row[col] = mine[0][col] if col == "mode" else float(np.mean([r[col] for r in mine]))
                if all(s.get("utility") for s in scores):
                    row.update(utility_summary([np.asarray(s["utility"]) for s in scores]))
                else:
                    row.update(utility=float(np.mean([r["utility"] for r in mine])))
            store.write(row)
            written += 1
    return written
