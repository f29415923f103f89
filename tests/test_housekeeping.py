"""Result keys carry the code revision (stale rows are reported and recomputed, or kept on request), failed
cells are retried on request, and `run` exits 1 naming how many cells failed."""

import pytest

from suite.cli import main
from suite.experiment.config import parse_config
from suite.experiment.revision import code_revision, key_part, source_hash
from suite.experiment.schedule import run_matrix
from suite.experiment.store import ResultsStore

ONE_CELL = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 1, "batch_size": 2},
    "matrix": {"splits": [0], "threats": ["curious_server"], "attacks": ["nearest_embedding"], "defenses": ["none"],
               "blind": False},  # one cell: no blind baseline row beside it
}


def _rows(out):
    with ResultsStore(out) as store:
        return store.rows()


def test_revision_label_holds_the_source_hash():
    rev = code_revision()
    assert source_hash() in rev and key_part(rev) == source_hash()


def test_rows_from_other_code_are_reported_recomputed_and_replaced(tmp_path, monkeypatch):
    cfg = parse_config(ONE_CELL)
    run_matrix(cfg, tmp_path)
    [old] = _rows(tmp_path)
    assert old["code_revision"] == code_revision() and old["cell_id"]

    for where in ("suite.experiment.plan", "suite.experiment.schedule"):  # the row's and the key's revision
        monkeypatch.setattr(f"{where}.code_revision", lambda: "9.9.9+src-0123456789abcdef")
    notes = []
    kept = run_matrix(cfg, tmp_path, keep_stale=True, on_note=notes.append)
    assert kept["ran"] == 0 and kept["stale"] == {old["code_revision"]: 1}
    assert "kept and reused" in notes[0] and old["code_revision"] in notes[0]

    notes.clear()
    summary = run_matrix(cfg, tmp_path, on_note=notes.append)
    assert summary["ran"] == 1 and "1 row from revision" in notes[0] and "recomputed" in notes[0]
    [new] = _rows(tmp_path)  # replaced, not duplicated
    assert new["code_revision"] == "9.9.9+src-0123456789abcdef" and new["key"] != old["key"]
    assert new["cell_id"] == old["cell_id"]
    assert run_matrix(cfg, tmp_path, on_note=notes.append)["ran"] == 0  # now current: reused


def test_failed_cells_make_run_exit_1_and_are_retried_on_request(tmp_path, monkeypatch, capsys):
    import attacks.nearest_embedding as ne

    config = tmp_path / "m.toml"
    config.write_text(
        '[model]\nname = "tiny-llama"\n[data]\nmax_length = 12\n'
        'private = { generator = "records", size = 8, seed = 1 }\nshadow = { generator = "records", size = 16 }\n'
        '[training]\nclients = 2\nsteps = 1\nbatch_size = 2\n'
        '[matrix]\nsplits = [0]\nthreats = ["curious_server"]\nattacks = ["nearest_embedding"]\ndefenses = ["none"]\nblind = false\n')
    out = tmp_path / "out"
    original = ne.NearestEmbeddingAttack.reconstruct

    def boom(self, obs):
        raise RuntimeError("inverter exploded")

    monkeypatch.setattr(ne.NearestEmbeddingAttack, "reconstruct", boom)
    assert main(["run", str(config), "--out", str(out), "--no-report"]) == 1
    assert "1 of 1 cells failed; see `splitleak results" in capsys.readouterr().err
    assert [r["status"] for r in _rows(out)] == ["failed"]

    monkeypatch.setattr(ne.NearestEmbeddingAttack, "reconstruct", original)
    assert main(["run", str(config), "--out", str(out), "--no-report"]) == 1  # failed rows are not rerun
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(out), "--no-report", "--retry-failed"]) == 0
    assert "retrying 1 failed cell" in capsys.readouterr().err
    assert [r["status"] for r in _rows(out)] == ["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("kills", [1])
def test_chaos_script_loses_nothing(tmp_path, kills):
    """The kill-chaos script itself (one kill, to stay fast): nothing lost or duplicated, rows equal."""
    from suite.harness.chaos import chaos

    summary = chaos(kills, seed=5, work=tmp_path, log=lambda _: None)
    assert summary["kills"] == kills and summary["lost"] == 0 and summary["duplicated"] == 0 and summary["equal"]
