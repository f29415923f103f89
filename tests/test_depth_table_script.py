"""examples/scripts/depth_table.py: the family table BENCHMARKS prints, a column per (model, k)."""

import importlib.util
from pathlib import Path

from synthetic_store import cell, write_store


def _script():
    path = Path(__file__).parent.parent / "examples" / "scripts" / "depth_table.py"
    spec = importlib.util.spec_from_file_location("depth_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_column_per_model_and_depth_with_the_cost_beside_its_reference(tmp_path, capsys):
    rows = []
    for model, ppl in (("small", {0: 72.4, 2: 72.5}), ("large", {0: 40.0, 2: 41.0})):
        for k in (0, 2):
            for attack, acc in (("inv", 0.9 if k else 1.0), ("blind", 0.1), ("hijack", 0.95)):
                row = cell(f"{model}-{attack}-{k}", k, "curious_server", attack, "none", acc=acc, loss=4.0)
                # the active attack trained its own (worse) run: the column's cost is the honest one
                hijacked = 9.0 if attack == "hijack" else 0.0
                row.update(model=model, perplexity=ppl[k] + hijacked, perplexity_centralised=ppl[0] - 0.6)
                rows.append(row)
    _script().main([str(write_store(tmp_path, rows))])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| attack"))
    assert header == "| attack | large k = 0 | large k = 2 | small k = 0 | small k = 2 |"
    inv = next(line for line in lines if line.startswith("| inv "))
    assert inv.split(" | ")[4].startswith("0.900 [0.88, 0.92] (+0.80)")
    assert lines[lines.index(inv) + 1].startswith("| blind | 0.100")
    cost = next(line for line in lines if line.startswith("| held-out perplexity"))
    assert cost == ("| held-out perplexity, split / centralised | 40.00 / 39.40 | 41.00 / 39.40 | 72.40 / 71.80 "
                    "| 72.50 / 71.80 |")


def test_the_cost_row_falls_back_on_the_loss_and_says_when_there_is_no_reference(tmp_path, capsys):
    rows = []
    for k, extra in ((0, {"utility_centralised": None}), (1, {"utility_centralised": 2.0}), (2, {"utility": None})):
        for attack, acc in (("inv", 0.5), ("blind", 0.1)):
            row = cell(f"{attack}-{k}", k, "curious_server", attack, "none", acc=acc, loss=1.0)
            row.update(extra)
            rows.append(row)
    _script().main([str(write_store(tmp_path, rows))])
    cost = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| held-out perplexity"))
    assert cost == "| held-out perplexity, split / centralised | 2.72 / – | 2.72 / 7.39 |  |"
