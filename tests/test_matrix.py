"""The matrix runner and results store: expansion, capability filtering, failures, resume after kill -9."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from store_rows import comparable_rows, differences

from suite.cli import main
from suite.errors import ConfigError
from suite.experiment.config import parse_config
from suite.experiment.plan import expand
from suite.experiment.schedule import run_matrix
from suite.experiment.store import ResultsStore, load_results

MATRIX = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 2},
    "matrix": {"splits": [0, 1], "threats": ["curious_server", "eavesdropper", "colluding_client"],
               "attacks": ["nearest_embedding", "wire_inversion"], "defenses": ["none", "encryption"]},
}
TOML = """
[model]
name = "tiny-llama"
[data]
max_length = 12
private = { generator = "records", size = 8, seed = 1 }
shadow = { generator = "records", size = 16, seed = 2 }
[training]
clients = 2
steps = 2
batch_size = 2
[matrix]
splits = [0, 1, 2]
threats = ["curious_server", "eavesdropper", "colluding_client"]
attacks = ["nearest_embedding", "wire_inversion"]
defenses = ["none", "encryption"]
"""


def test_expansion_and_capability_filtering():
    cells, skipped = expand(parse_config(MATRIX))
    assert len(cells) + len(skipped) == 2 * 3 * (2 + 1) * 2  # + the blind baseline under every threat
    assert {(c.threat, c.attack) for c in cells} == {
        ("curious_server", "nearest_embedding"), ("colluding_client", "nearest_embedding"),
        ("eavesdropper", "wire_inversion"),
        ("curious_server", "blind"), ("colluding_client", "blind"), ("eavesdropper", "blind")}
    reasons = {(c.threat, c.attack): r for c, r in skipped}
    assert "activations" in reasons[("eavesdropper", "nearest_embedding")]
    assert "wire" in reasons[("curious_server", "wire_inversion")]
    groups = {c.training_group() for c in cells}
    # one training run per split, shared by all passive cells; encryption only changes the wire's bytes, so
    # its cells reuse the undefended run's training
    assert len(groups) == 2


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"threats": ["curious_sever"]}, "matrix.threats[0]: unknown threat 'curious_sever'"),
        ({"attacks": ["nearest_embedding", "nearest_embeding"]}, "matrix.attacks[1]: unknown attack"),
        ({"defenses": ["none", {"name": "encryption", "mode": "rot13"}]}, "matrix.defenses[1]"),
        ({"attacks": [{"name": "nearest_embedding", "bogus": 1}]}, "no parameter 'bogus'"),
    ],
)
def test_matrix_validation_names_the_entry(patch, needle):
    bad = {**MATRIX, "matrix": {**MATRIX["matrix"], **patch}}
    with pytest.raises(ConfigError) as err:
        expand(parse_config(bad))
    assert needle in str(err.value)


def test_store_rows_and_dataframe(tmp_path):
    summary = run_matrix(parse_config(MATRIX), tmp_path)
    assert summary["ran"] == summary["cells"] == 24
    df = load_results(tmp_path)
    assert len(df) == 24 and set(df["status"]) == {"ok"}
    for col in ("bleu4", "rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match", "pii_recovery", "utility",
                "attack_seconds", "key", "config", "versions"):
        assert col in df.columns
    enc = df[(df.threat == "eavesdropper") & (df.defense == "encryption") & (df.attack != "blind")]
    assert (enc.token_accuracy == 0).all()
    assert df.iloc[0]["versions"]["torch"]
    again = run_matrix(parse_config(MATRIX), tmp_path)  # nothing left to do
    assert again["ran"] == 0


def test_passive_cells_with_the_same_observations_are_computed_once(tmp_path, monkeypatch):
    import attacks.nearest_embedding as ne

    calls = []
    real = ne.NearestEmbeddingAttack.reconstruct

    def counted(self, obs):
        calls.append(obs.threat.name)
        return real(self, obs)

    monkeypatch.setattr(ne.NearestEmbeddingAttack, "reconstruct", counted)
    cfg = {**MATRIX, "matrix": {"splits": [1], "threats": ["curious_server", "malicious_server", "colluding_client"],
                                "attacks": ["nearest_embedding"], "defenses": ["none"]}}
    run_matrix(parse_config(cfg), tmp_path)
    assert calls == ["curious_server", "colluding_client"]  # the malicious server's passive view is the curious one's
    df = load_results(tmp_path)
    df = df[df.attack == "nearest_embedding"].set_index("threat")
    assert len(df) == 3 and set(df["status"]) == {"ok"}
    for m in ("token_accuracy", "bleu4", "pii_recovery", "utility"):
        assert df.loc["malicious_server", m] == df.loc["curious_server", m]
    assert "same observations as curious_server" in df.loc["malicious_server", "note"]


def test_failing_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import attacks.nearest_embedding as ne

    def boom(self, obs):
        raise RuntimeError("inverter exploded")

    monkeypatch.setattr(ne.NearestEmbeddingAttack, "reconstruct", boom)
    run_matrix(parse_config(MATRIX), tmp_path)
    with ResultsStore(tmp_path) as store:
        rows = store.rows()
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("inverter exploded" in r["error"] for r in failed)
    assert any(r["status"] == "ok" for r in rows)  # the wire cells still ran


def _count(path) -> int:
    try:
        with sqlite3.connect(path, timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_resume_after_kill_gives_identical_rows(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(TOML)
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    cmd = [sys.executable, "-m", "suite.cli", "run", str(cfg), "--out"]
    subprocess.run([*cmd, str(reference)], check=True, capture_output=True)
    total = _count(reference / "results.sqlite")
    assert total == 36  # 18 cells and the blind baseline's 18

    stop_after = random.Random(os.getpid()).randint(1, total - 1)
    proc = subprocess.Popen([*cmd, str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count(killed / "results.sqlite") < stop_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _count(killed / "results.sqlite")
    assert partial < total, "the run finished before it could be killed"
    subprocess.run([*cmd, str(killed)], check=True, capture_output=True)

    resumed = _rows(killed)
    assert len(resumed) == total
    assert not differences(resumed, _rows(reference))


def test_results_command_prints_the_table(tmp_path, capsys):
    run_matrix(parse_config(MATRIX), tmp_path)
    assert main(["results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nearest_embedding" in out and "token_accuracy" in out
    assert main(["results", str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_embedded_default_matrix_is_valid():
    from suite.experiment.config import DEFAULT_MATRIX, load_config

    cfg = load_config(DEFAULT_MATRIX)
    cells, skipped = expand(cfg)
    # the depth comparison: the embedding alone, one block (FL-GLM's claim) and a deeper split
    assert cfg.model.name == "smollm2-135m" and cfg.matrix.splits == [0, 1, 2]
    assert {c.threat for c in cells} == {"curious_server", "malicious_server", "colluding_client", "eavesdropper",
                                         "peer_client"}
    assert {c.defense for c in cells} == {"none", "encryption", "dp_gaussian", "dxp", "nopeek"}
    for swept in ("dp_gaussian", "dxp"):  # each a sweep of >= 3 settings (the frontier's points)
        assert len({c.defense_params for c in cells if c.defense == swept}) >= 3
    # the colluding and peer clients face the defended settings in examples/configs/defended_clients.toml (for time)
    assert {c.threat for c in cells if c.defense in ("dp_gaussian", "dxp", "nopeek")} == {
        "curious_server", "malicious_server", "eavesdropper"}
    assert {c.attack for c in cells} >= {"blind", "fsha", "gradient_inversion", "wire_inversion"}
    assert skipped  # e.g. fsha needs control of the server
    assert cfg.executor.workers == 2  # both cores of a small machine
    # the strongest attack undefended at every split; every attack undefended at every split; sweeps at k = 1
    assert {c.head_blocks for c in cells if c.attack == "prefix_inversion" and c.defense == "none"} == {0, 1, 2}
    for k in (0, 2):
        assert {c.attack for c in cells if c.head_blocks == k and c.defense == "none"} >= {
            "blind", "nearest_embedding", "learned_inversion", "gradient_inversion", "wire_inversion",
            "prefix_inversion"}
    assert {c.head_blocks for c in cells if c.defense in ("dp_gaussian", "dxp", "nopeek")} == {1}
    # DP's clip is calibrated on public text, never a fixed number far below the head's norms
    dp = [json.loads(c.defense_params) for c in cells if c.defense == "dp_gaussian"]
    assert all(p.get("clip_quantile") == 0.5 and "clip" not in p for p in dp)


def test_skip_rules_take_a_split_and_lists():
    cfg = parse_config({**MATRIX, "matrix": {**MATRIX["matrix"], "splits": [0, 1],
                                             "skip": [{"split": [0], "attack": ["wire_inversion"]}]}})
    cells, skipped = expand(cfg)
    assert not [c for c in cells if c.head_blocks == 0 and c.attack == "wire_inversion"]
    assert [c for c in cells if c.head_blocks == 1 and c.attack == "wire_inversion"]
    assert any(r == "left out by matrix.skip[0]" for _, r in skipped)
    with pytest.raises(ConfigError, match=r"skip\[0\].split: give a head block count or a list of them"):
        parse_config({**MATRIX, "matrix": {**MATRIX["matrix"], "skip": [{"split": "1"}]}})


def test_worker_processes_give_the_rows_of_one_process(tmp_path):
    cfg = parse_config(MATRIX)
    one = run_matrix(cfg, tmp_path / "one")
    two = run_matrix(cfg, tmp_path / "two", workers=2)
    assert one["ran"] == two["ran"] == one["cells"]
    assert not differences(_rows(tmp_path / "one"), _rows(tmp_path / "two"))


def _rows(path):
    return comparable_rows(path)


def test_workers_below_one_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
