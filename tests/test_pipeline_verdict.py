"""Page-1 pipeline rows (review finding 4): a setting checked only by weaker attacks is never called
sufficient (training's ``_verified`` rule), and a threat whose cells all failed has an "unknown" row."""

import math

from synthetic_store import cell, sweep_rows, write_store

from reports import tables
from reports.pipeline import verdict_rows
from suite.experiment.store import load_results


def _frame(tmp_path, rows):
    return tables.prepare(load_results(write_store(tmp_path, [{**r, "stages": 4} for r in rows])))


def _server(rows):
    return next(r for r in rows if r["threat"] == "curious_server")


def test_a_pipeline_setting_checked_only_by_weaker_attacks_is_not_sufficient(tmp_path):
    rows = sweep_rows() + [cell(f"prefix-{k}", k, "curious_server", "prefix", "none", acc=1.0, loss=3.0 + 0.1 * k)
                           for k in (0, 1, 2)]
    assert _server(verdict_rows(_frame(tmp_path / "a", rows)))["cheapest"] is None
    rows += [cell(f"dxp30-prefix-{k}", k, "curious_server", "prefix", "dxp", {"eta": 30}, acc=0.12,
                  loss=3.0 + 0.1 * k + math.log(1.12)) for k in (0, 1, 2)]
    assert _server(verdict_rows(_frame(tmp_path / "b", rows)))["cheapest"] == "dxp (eta=30) at k=0"


def test_a_pipeline_threat_whose_cells_all_failed_is_unknown(tmp_path):
    rows = sweep_rows() + [{**cell("sf", 1, "curious_stage:1", "inv", "none", acc=0.9, loss=3.1),
                            "status": "failed", "error": "stage 1 crashed"}]
    row = next(r for r in verdict_rows(_frame(tmp_path, rows)) if r["threat"] == "curious_stage:1")
    assert row["level"] == "unknown" and "stage 1 crashed" in row["note"]
