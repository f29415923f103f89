"""The results store: one SQLite row per matrix cell, written atomically the moment the cell finishes.

Each row is keyed by the cell key (a hash of the cell's config, model revision and seed), so a run killed at
any moment — even ``kill -9`` — and started again with the same command skips the finished cells and ends
with the rows an uninterrupted run has. SQLite's journal makes every ``INSERT`` all-or-nothing.
Reports read only this store. The store holds victims' text (samples), so it is created 0600, and so are its
``-wal``/``-shm`` side files (SQLite gives them the database's mode); a store found with a wider mode is
narrowed to 0600.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from suite.errors import SplitleakError

METRICS = ("bleu4", "rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match", "pii_recovery")
# The evaluation contracts (docs/report.md): every leakage metric m also has m_lo / m_hi (95 % bootstrap interval over
# records x seeds) and adv_m (m minus what the blind baseline gets on the same records) with its interval.
INTERVAL_COLUMNS = tuple(f"{m}_{end}" for m in (*METRICS, "utility") for end in ("lo", "hi"))
ADVANTAGE_COLUMNS = tuple(c for m in METRICS for c in (f"adv_{m}", f"adv_{m}_lo", f"adv_{m}_hi"))

INFERENCE_COLUMNS = tuple(f"{pre}{part}_{m}{end}" for part in ("prompt", "response") for m in METRICS
                          for pre, end in (("", ""), ("", "_lo"), ("", "_hi"), ("adv_", ""), ("adv_", "_lo"),
                                           ("adv_", "_hi")))

# name -> SQLite type. Timing columns (attack_seconds, attack_peak_rss_mib, finished_at) are the only ones
# that differ between two runs of the same cell.
COLUMNS: dict[str, str] = {
    "key": "TEXT PRIMARY KEY",
    "model": "TEXT",
    "revision": "TEXT",
    "head_blocks": "INTEGER",
    "tail_blocks": "INTEGER",
    "strategy": "TEXT",
    "threat": "TEXT",
    "attack": "TEXT",
    "attack_params": "TEXT",  # JSON
    "defense": "TEXT",
    "defense_params": "TEXT",  # JSON
    "seed": "INTEGER",
    **{m: "REAL" for m in METRICS},
    "utility": "REAL",  # held-out loss of the fine-tuned model (lower is better)
    "perplexity": "REAL",  # exp(utility): held-out perplexity under the deployed defense
    "utility_centralised": "REAL",  # held-out loss of a centralised LoRA fine-tune on the same data (reference)
    "perplexity_centralised": "REAL",
    # JSON: optimiser steps each party took ({"server": {adapter set: n}, "clients": [n, ...], "reference": n});
    # the capture of the traffic adds none
    "optimizer_steps": "TEXT",
    **{c: "REAL" for c in INTERVAL_COLUMNS},
    **{c: "REAL" for c in ADVANTAGE_COLUMNS},
    # Pipeline stages ([training] stages): S, and for a stage threat the stages it holds ("1", "0,2") and the
    # first block whose input it sees (its depth, as a server at that split); NULL for other threats
    "stages": "INTEGER",
    "stage": "TEXT",
    "stage_block": "INTEGER",
    "steps": "INTEGER",  # training steps of the cell (the [matrix] steps axis, else [training] steps)
    "finetune": "TEXT",  # what the clients fine-tuned (the [matrix] finetune axis, else [training] finetune)
    "axes": "TEXT",  # JSON: the training axes the cell sweeps ({"steps": 3, "seed": 1}), NULL when none
    # Seeds ([matrix] seeds): one row per seed (``seed``), and once every seed of a cell is done an aggregate
    # row (``seed`` NULL, ``seeds`` = JSON list) whose metrics, intervals and advantages pool records x seeds.
    # Per-seed rows name it in ``aggregate_key``; ``rows()``/``load_results`` hide them unless per_seed=True.
    "seeds": "TEXT",
    "aggregate_key": "TEXT",
    "record_scores": "TEXT",  # JSON: per-record statistics (suite.scoring.intervals) of the cell and of blind, utility
    "adaptive": "INTEGER",  # 1: the attack simulated the defense (knows its public parameters); 0: it did not
    "attack_seconds": "REAL",
    "attack_peak_rss_mib": "REAL",
    "status": "TEXT",  # ok | failed
    "error": "TEXT",
    "note": "TEXT",
    "defense_report": "TEXT",  # JSON: what the defense measured or guarantees (e.g. epsilon)
    "samples": "TEXT",  # JSON list of {reference, reconstruction, pii: {field: [value, recovered]}}
    "config": "TEXT",  # JSON of the whole run config
    "versions": "TEXT",  # JSON of package versions
    "finished_at": "REAL",
    "code_revision": "TEXT",  # the code that computed the row (suite.experiment.revision.code_revision); part of the key
    "cell_id": "TEXT",  # the cell's key without the code revision: finds a row of the same cell from other code
    # Inference cells (docs/inference.md): mode, the leakage of the prompt and of the response separately
    # (the plain metric columns then cover the whole observed sequence), and utility at inference.
    "mode": "TEXT",  # training | inference (NULL in stores written before: training)
    **{c: "REAL" for c in INFERENCE_COLUMNS},
    "answer_rougeL": "REAL",  # ROUGE-L (0-100) of the deployed answers against the undefended split's answers
    "seconds_per_token": "REAL",  # generation latency per token (wire included, in process)
    "bytes_per_token": "REAL",  # bytes on the wire per generated token, both directions
}
# Memorisation (docs/memorisation.md): canary exposure (bits), membership AUC and TPR at low FPR,
# the share of canaries extracted verbatim, each with its interval; ``memorisation`` (JSON) holds the view,
# the breakdown per repeat count, every membership signal, the ROC curve and the false positives TPR rests on.
MEMORISATION_METRICS = ("exposure", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "extracted")
COLUMNS.update({c: "REAL" for m in MEMORISATION_METRICS for c in (m, f"{m}_lo", f"{m}_hi")})
COLUMNS["memorisation"] = "TEXT"
TIMING = ("attack_seconds", "attack_peak_rss_mib", "finished_at", "seconds_per_token")


def cell_label(row: Mapping[str, Any]) -> str:
    """The one label of a cell, from its row or a ``Cell``'s fields: the model (where given), the split,
    threat, attack and defense with their parameters, every training axis the cell sweeps (``axes``, by name)
    and " [non-adaptive]" where the attack did not simulate the defense. ``Cell.label``, the progress of a run,
    the gate and the report all use it, so two cells of one matrix never share a label."""

    def params(p) -> str:
        p = json.loads(p) if isinstance(p, str) else (p or {})
        return "" if not p else json.dumps(p, sort_keys=True, separators=(",", ":"))

    axes = row.get("axes")
    axes = json.loads(axes) if isinstance(axes, str) else (axes or {})
    adaptive = row.get("adaptive")  # the default (adaptive, or not recorded) keeps the label it always had
    mode = " [non-adaptive]" if adaptive is not None and not int(adaptive) else ""
    model = f"{row['model']} " if row.get("model") else ""
    phase = " [inference]" if row.get("mode") == "inference" else ""  # training cells keep their label
    return (f"{model}k={row['head_blocks']} m={row['tail_blocks']} {row['threat']}/{row['attack']}"
            f"{params(row['attack_params'])}/{row['defense']}{params(row['defense_params'])}"
            + "".join(f" {k}={v}" for k, v in sorted(axes.items())) + mode + phase)


class ResultsStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.sqlite"
        _private(self.path)
        self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        cols = ", ".join(f'"{k}" {t}' for k, t in COLUMNS.items())
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS cells ({cols})")
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(cells)")}
        for name, kind in COLUMNS.items():  # a store written by an older version gains the new columns
            if name not in have:
                self._conn.execute(f'ALTER TABLE cells ADD COLUMN "{name}" {kind}')

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def done(self) -> set[str]:
        """Keys of cells that finished (ok or failed) — a resumed run skips them."""
        return {k for (k,) in self._conn.execute("SELECT key FROM cells")}

    def statuses(self) -> dict[str, str]:
        """key -> status ("ok" | "failed") of every row."""
        return {k: s for k, s in self._conn.execute("SELECT key, status FROM cells")}

    def revisions_by_cell(self) -> dict[str, list[tuple[str, str | None]]]:
        """cell id -> [(key, code revision)] of its rows. A row written before keys held the code revision has
        no cell id: its key is the cell id (the same hash, without the revision)."""
        out: dict[str, list[tuple[str, str | None]]] = {}
        for key, cell_id, rev in self._conn.execute("SELECT key, cell_id, code_revision FROM cells"):
            out.setdefault(cell_id or key, []).append((key, rev))
        return out

    def write(self, row: dict[str, Any]) -> None:
        """Insert one finished cell in a single transaction (all or nothing). A row with a ``cell_id``
        replaces the rows of the same cell computed by other code (stale rows), in the same transaction."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}")
        row = {**row, "finished_at": row.get("finished_at", time.time())}
        values = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in row.items()}
        names = ", ".join(f'"{k}"' for k in values)
        marks = ", ".join("?" for _ in values)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if row.get("cell_id"):
                self._conn.execute("DELETE FROM cells WHERE (cell_id = ? OR key = ?) AND key != ?",
                                   (row["cell_id"], row["cell_id"], row["key"]))
            self._conn.execute(f"INSERT OR REPLACE INTO cells ({names}) VALUES ({marks})", list(values.values()))
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def rows(self, per_seed: bool = False) -> list[dict[str, Any]]:
        """Every row; per-seed rows whose aggregate row exists only with ``per_seed``."""
        cur = self._conn.execute("SELECT * FROM cells ORDER BY model, head_blocks, threat, attack, defense, key")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur]
        if per_seed:
            return rows
        keys = {r["key"] for r in rows}
        return [r for r in rows if r.get("aggregate_key") not in keys]


def _private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would use 0644 less the umask), and narrow an
    existing one and its side files to 0600 (best effort: a store owned by someone else is left alone)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError:
        return  # read-only, or not ours: sqlite3.connect reports what is wrong
    for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            if p.stat().st_mode & 0o077:
                p.chmod(0o600)
        except OSError:
            pass


def open_store(directory: str | Path, must_exist: bool = False) -> ResultsStore:
    path = Path(directory) / "results.sqlite"
    if must_exist and not path.is_file():
        raise SplitleakError(f"no results store at {path}; run 'splitleak run --out {directory}' first")
    return ResultsStore(directory)


def load_results(directory: str | Path, per_seed: bool = False):
    """The store as a pandas DataFrame (JSON columns decoded). A cell run with several seeds is one
    aggregate row (records x seeds); ``per_seed=True`` adds its per-seed rows."""
    import pandas as pd

    with open_store(directory, must_exist=True) as store:
        rows = store.rows(per_seed=per_seed)
    for row in rows:
        for k in ("attack_params", "defense_params", "defense_report", "samples", "config", "versions", "seeds",
                  "record_scores", "optimizer_steps", "axes", "memorisation"):
            if isinstance(row.get(k), str):
                row[k] = json.loads(row[k])
    return pd.DataFrame(rows, columns=list(COLUMNS))


def comparable(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the timing columns, sorted by key: what two runs of the same matrix must agree on."""
    return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows), key=lambda r: r["key"])
