"""The CI gate passes on a run's own baseline and fails on a doctored one, in each direction; bands come from the
intervals, metrics at their floor or ceiling are checked the way they can move, a band that can never trip is
refused, and the JUnit / markdown outputs carry one case per cell and metric."""

import json
import xml.etree.ElementTree as ET

import pytest
from synthetic_store import cell, sweep_rows, write_store

from reports.gate import DOWN, GATED, UP, check, load_baseline, make_baseline, never_trip
from suite.cli import main
from suite.errors import SplitleakError
from suite.experiment.config import parse_config
from suite.experiment.schedule import run_matrix
from suite.experiment.store import MEMORISATION_METRICS

MATRIX = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 2},
    "matrix": {"splits": [1], "threats": ["curious_server", "eavesdropper"],
               "attacks": ["nearest_embedding", "wire_inversion"], "defenses": ["none", "encryption"]},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_matrix(parse_config(MATRIX), out)
    return out


def _baseline(run_dir, tmp_path, capsys, edit=None):
    assert main(["baseline", str(run_dir)]) == 0
    data = json.loads(capsys.readouterr().out)
    if edit:
        edit(data)
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(data))
    return path


def test_check_passes_on_its_own_baseline(run_dir, tmp_path, capsys):
    path = _baseline(run_dir, tmp_path, capsys)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_check_fails_when_leakage_under_a_defense_rises(run_dir, tmp_path, capsys):
    def lower_defended(data):
        for label, c in data["cells"].items():
            if "/encryption" in label and "eavesdropper" in label:  # the run now leaks more than the band allows
                c["metrics"]["token_accuracy"].update(value=-0.5, lo=-0.55, hi=-0.45, check="up")

    path = _baseline(run_dir, tmp_path, capsys, lower_defended)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 1
    out = capsys.readouterr().out
    assert "eavesdropper/wire_inversion/encryption: leakage under defense rose: token_accuracy" in out


def test_check_fails_when_an_undefended_attack_gets_weaker(run_dir, tmp_path, capsys):
    def raise_undefended(data):
        for label, c in data["cells"].items():
            if "/none" in label and "nearest_embedding" in label:
                c["metrics"]["bleu4"].update(value=150.0, lo=145.0, hi=155.0, check="down")

    path = _baseline(run_dir, tmp_path, capsys, raise_undefended)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 1
    assert "curious_server/nearest_embedding/none: attack got weaker without defense: bleu4" in capsys.readouterr().out


def test_check_fails_on_a_missing_cell_and_bad_files(run_dir, tmp_path, capsys):
    def add_cell(data):
        data["cells"]["ghost k=9 m=1 curious_server/x/none"] = {
            "defended": False, "metrics": {"bleu4": {"value": 10.0, "lo": 5.0, "hi": 15.0, "check": "down"}}}

    path = _baseline(run_dir, tmp_path, capsys, add_cell)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 1
    assert "missing from the run" in capsys.readouterr().out
    assert main(["check", str(run_dir), "--baseline", str(tmp_path / "none.json")]) == 2
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert main(["check", str(run_dir), "--baseline", str(tmp_path / "junk.json")]) == 2
    assert "not a splitleak baseline" in capsys.readouterr().err


# -- synthetic stores: intervals, advantage, floors and ceilings ------------------------------------------------


def _run_check(store_dir, baseline, tmp_path, *extra):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline))
    return main(["check", str(store_dir), "--baseline", str(path), *extra])


def test_baseline_never_writes_a_band_that_cannot_trip_and_passes_its_own_check(tmp_path, capsys):
    rows = sweep_rows() + [
        cell("wide", 1, "curious_server", "inv", "dxp", {"eta": 3}, acc=0.5, loss=3.1),  # interval over all
        cell("top", 1, "curious_server", "inv", "encryption", {"x": 1}, acc=1.0, loss=3.1, intervals=False),
    ]
    rows[-2].update(token_accuracy_lo=0.0, token_accuracy_hi=1.0)
    store = write_store(tmp_path / "run", rows)
    assert main(["baseline", str(store)]) == 0
    baseline = json.loads(capsys.readouterr().out)
    assert never_trip(baseline) == []
    assert {m for c in baseline["cells"].values() for m in c["metrics"]} == set(GATED) - set(MEMORISATION_METRICS) - {
        f"adv_{m}" for m in GATED if not m.startswith("adv_") and m != "token_accuracy"}
    assert _run_check(store, baseline, tmp_path) == 0
    out = capsys.readouterr().out
    assert "0 regressions -> ok" in out
    assert "up (leakage must not rise): " in out and "down (attack must not weaken): " in out


def test_bands_come_from_the_intervals(tmp_path, capsys):
    row = cell("a", 1, "curious_server", "inv", "dxp", {"eta": 1}, acc=0.40, loss=3.0)
    row.update(token_accuracy_lo=0.30, token_accuracy_hi=0.46)
    band = make_baseline(write_store(tmp_path / "a", [row]))["cells"]
    band = next(iter(band.values()))["metrics"]["token_accuracy"]
    assert (band["lo"], band["hi"], band["check"], band["source"]) == (0.30, 0.46, UP, "interval")
    baseline = make_baseline(tmp_path / "a")
    write_store(tmp_path / "a", [{**row, "token_accuracy": 0.45}])  # inside the interval: passes
    assert _run_check(tmp_path / "a", baseline, tmp_path) == 0
    write_store(tmp_path / "a", [{**row, "token_accuracy": 0.47}])  # above it: a privacy regression
    assert _run_check(tmp_path / "a", baseline, tmp_path) == 1
    assert "leakage under defense rose: token_accuracy 0.4 -> 0.47 (band up to 0.46)" in capsys.readouterr().out


def test_a_metric_at_its_floor_or_ceiling_is_checked_the_way_it_can_move(tmp_path, capsys):
    floor = cell("f", 1, "curious_server", "weak", "none", acc=0.0, loss=3.0)  # undefended attack at 0
    ceiling = cell("c", 1, "curious_server", "inv", "encryption", acc=1.0, loss=3.0)  # defended, full leakage
    store = write_store(tmp_path / "run", [floor, ceiling])
    baseline = make_baseline(store)
    bands = {label.split("/")[1]: c["metrics"] for label, c in baseline["cells"].items()}
    assert bands["weak"]["token_accuracy"]["check"] == UP and bands["weak"]["token_accuracy"]["reason"] == "at its floor"
    assert bands["inv"]["token_accuracy"]["check"] == DOWN
    assert bands["inv"]["token_accuracy"]["reason"] == "at its ceiling"
    assert _run_check(store, baseline, tmp_path) == 0
    capsys.readouterr()
    write_store(store, [{**floor, "token_accuracy": 0.3}, {**ceiling, "token_accuracy": 0.6}])
    assert _run_check(store, baseline, tmp_path) == 1
    out = capsys.readouterr().out
    assert "weak/none: rose off its floor: token_accuracy 0 -> 0.3" in out
    assert "inv/encryption: fell from its ceiling: token_accuracy 1 -> 0.6" in out


def test_check_refuses_a_baseline_with_a_band_that_can_never_trip(tmp_path, capsys):
    store = write_store(tmp_path / "run", [cell("f", 1, "curious_server", "weak", "none", acc=0.0, loss=3.0)])
    legacy = {"format": 1, "tolerance": {"token_accuracy": 0.05},  # today's format: down-only at the floor
              "cells": {"m k=1 m=1 curious_server/weak/none": {"defended": False, "metrics": {"token_accuracy": 0.0}}}}
    assert _run_check(store, legacy, tmp_path) == 2
    captured = capsys.readouterr()
    assert "NEVER TRIPS m k=1 m=1 curious_server/weak/none: token_accuracy = 0 checked down can never trip" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "has 1 bands that can never trip (listed above)" in err[0]
    doctored = make_baseline(store)
    band = next(iter(doctored["cells"].values()))["metrics"]["bleu4"]
    band.update(check="up", hi=100.0)
    assert _run_check(store, doctored, tmp_path) == 2
    with pytest.raises(SplitleakError, match="can never trip"):
        check(store, load_baseline(tmp_path / "baseline.json"))


def test_junit_and_markdown(tmp_path, capsys):
    store = write_store(tmp_path / "run", [r for r in sweep_rows() if r["head_blocks"] == 1])
    baseline = make_baseline(store)
    n_cases = sum(len(c["metrics"]) for c in baseline["cells"].values())
    label = next(k for k in baseline["cells"] if k.endswith("/dxp{\"eta\":30}") and "/inv/" in k)
    baseline["cells"][label]["metrics"]["token_accuracy"].update(value=0.0, lo=-0.1, hi=0.01)
    junit = tmp_path / "out" / "check.xml"
    junit.parent.mkdir()
    assert _run_check(store, baseline, tmp_path, "--junit", str(junit), "--markdown") == 1
    md = capsys.readouterr().out
    root = ET.parse(junit).getroot()
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == n_cases == int(root.find("testsuite").get("tests"))
    assert len({(c.get("classname"), c.get("name")) for c in cases}) == n_cases
    failed = [c for c in cases if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [(label, "token_accuracy (up)")]
    assert "leakage under defense rose: token_accuracy 0 -> 0.13" in failed[0].find("failure").get("message")
    assert md.startswith("### splitleak check: FAIL")
    assert "| Cell | Metric | Check | Baseline | Band | Now | Result |" in md
    assert f"| {label} | token_accuracy | up | 0 | -0.1 – 0.01 | 0.13 | ❌ leakage under defense rose" in md
    assert md.count("✅") == n_cases - 1
    assert main(["check", str(store), "--baseline", str(tmp_path / "baseline.json"), "--junit",
                 str(tmp_path / "no" / "dir" / "x.xml")]) == 2


def test_swept_cells_keep_their_own_baseline_entries(tmp_path):
    """Cells that differ only in a swept training axis (steps, finetune, seed, …) are different cells in the
    baseline: the label is the cell's one label (``Cell.label``), which names every swept axis."""
    from suite.experiment.plan import Cell

    rows = []
    for i, (steps, finetune) in enumerate([(2, "lora"), (8, "lora"), (2, "full")]):
        row = cell(f"s{i}", 1, "curious_server", "inv", "none", acc=0.5 + i / 10, loss=3.0)
        row.update(steps=steps, finetune=finetune, axes={"steps": steps, "finetune": finetune})
        rows.append(row)
    baseline = make_baseline(write_store(tmp_path / "run", rows))
    assert len(baseline["cells"]) == 3
    same = Cell(1, 1, "curious_server", "inv", "{}", "none", "{}", steps=8, finetune="lora")
    assert f"m {same.label()}" in baseline["cells"]  # the gate's label is the model and Cell.label
    assert baseline["cells"][f"m {same.label()}"]["metrics"]["token_accuracy"]["value"] == 0.6


def _memorisation(key, threat, attack, defense, dparams=None, *, space_bits=39.86, **metrics):
    """A memorisation row: its own columns with intervals, no leakage columns."""
    row = {"key": key, "model": "m", "revision": "r1", "head_blocks": 1, "tail_blocks": 1, "strategy": "per_client",
           "threat": threat, "attack": attack, "attack_params": {}, "defense": defense,
           "defense_params": dparams or {}, "seed": 0, "config": {"model": {"name": "m"}}, "versions": {},
           "status": "ok", "error": None, "note": "", "attack_seconds": 1.0, "utility": 3.0,
           "defense_report": {}, "memorisation": {"view": "released_model", "space_bits": space_bits}}
    for m, (v, lo, hi) in metrics.items():
        row.update({m: v, f"{m}_lo": lo, f"{m}_hi": hi})
    return row


def test_memorisation_columns_are_gated_and_a_planted_regression_fails(tmp_path, capsys):
    dp = {"sigma": 1.0, "clip": 1.0}
    rows = [
        _memorisation("e0", "model_user", "canary_exposure", "none", exposure=(12.0, 10.0, 14.0)),
        _memorisation("e1", "model_user", "canary_exposure", "dp_sgd", dp, exposure=(2.0, 1.5, 2.6)),
        _memorisation("e2", "adapter_thief", "canary_exposure", "dp_sgd", {"sigma": 0.1},
                      exposure=(39.86, 39.86, 39.86)),
        _memorisation("m1", "model_user", "membership", "dp_sgd", dp, auc=(0.52, 0.50, 0.54),
                      tpr_at_1pct_fpr=(0.012, 0.005, 0.02), tpr_at_0_1pct_fpr=(0.001, 0.0, 0.004)),
        _memorisation("x1", "model_user", "extraction", "dp_sgd", dp, extracted=(0.0, 0.0, 0.31)),
    ]
    store = write_store(tmp_path / "run", rows)
    baseline = make_baseline(store)
    bands = {label.split(" ", 3)[-1]: c["metrics"] for label, c in baseline["cells"].items()}
    exposure = bands["model_user/canary_exposure/dp_sgd" + '{"clip":1.0,"sigma":1.0}']["exposure"]
    assert (exposure["check"], exposure["lo"], exposure["hi"], exposure["ceiling"]) == (UP, 1.2, 2.8, 39.86)
    capped = bands["adapter_thief/canary_exposure/dp_sgd" + '{"sigma":0.1}']["exposure"]  # the whole space: it can only fall
    assert capped["check"] == DOWN and capped["reason"] == "at its ceiling"
    membership = bands["model_user/membership/dp_sgd" + '{"clip":1.0,"sigma":1.0}']
    assert set(membership) == {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"}
    assert all(b["check"] == UP for b in membership.values())
    assert never_trip(baseline) == []
    assert _run_check(store, baseline, tmp_path) == 0
    capsys.readouterr()
    # planted regressions: dp_sgd stops protecting (exposure and TPR rise), an undefended canary fades
    # (AUC moves inside its band: it passes)
    write_store(store, [{**rows[1], "exposure": 6.0}, {**rows[3], "auc": 0.53, "tpr_at_0_1pct_fpr": 0.05},
                        {**rows[0], "exposure": 4.0}])
    assert _run_check(store, baseline, tmp_path) == 1
    out = capsys.readouterr().out
    assert "canary_exposure/dp_sgd" in out and "leakage under defense rose: exposure 2 -> 6 (band up to 2.8)" in out
    assert "leakage under defense rose: tpr_at_0_1pct_fpr 0.001 -> 0.05" in out
    assert "attack got weaker without defense: exposure 12 -> 4 (band down to 10)" in out
    assert "3 regressions -> FAIL" in out
