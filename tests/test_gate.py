"""The CI gate passes on a run's own baseline and fails on a doctored one, in each direction."""

import json

import pytest

from suite.cli import main
from suite.config import parse_config
from suite.matrix import run_matrix

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
        for label, cell in data["cells"].items():
            if label.endswith("/encryption") and "eavesdropper" in label:
                cell["metrics"]["token_accuracy"] = -0.5  # the run now leaks more than the baseline allows

    path = _baseline(run_dir, tmp_path, capsys, lower_defended)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 1
    out = capsys.readouterr().out
    assert "eavesdropper/wire_inversion/encryption: leakage under defense rose: token_accuracy" in out


def test_check_fails_when_an_undefended_attack_gets_weaker(run_dir, tmp_path, capsys):
    def raise_undefended(data):
        for label, cell in data["cells"].items():
            if label.endswith("/none") and "nearest_embedding" in label:
                cell["metrics"]["bleu4"] = 150.0

    path = _baseline(run_dir, tmp_path, capsys, raise_undefended)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 1
    assert "curious_server/nearest_embedding/none: attack got weaker without defense: bleu4" in capsys.readouterr().out


def test_check_fails_on_a_missing_cell_and_bad_files(run_dir, tmp_path, capsys):
    def add_cell(data):
        data["cells"]["ghost k=9 m=1 curious_server/x/none"] = {"defended": False, "metrics": {"bleu4": 1.0}}

    path = _baseline(run_dir, tmp_path, capsys, add_cell)
    assert main(["check", str(run_dir), "--baseline", str(path)]) == 1
    assert "missing from the run" in capsys.readouterr().out
    assert main(["check", str(run_dir), "--baseline", str(tmp_path / "none.json")]) == 2
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert main(["check", str(run_dir), "--baseline", str(tmp_path / "junk.json")]) == 2
    assert "not a splitleak baseline" in capsys.readouterr().err
