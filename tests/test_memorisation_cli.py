"""`splitleak attack` with a memorisation attack: it trains the split with the config's canaries,
reads the threat's model view and prints exposure / membership / extraction with their intervals; what cannot
run is refused in one line before any training."""

import pytest

from suite.cli import main

CONFIG = """
[model]
name = "tiny-llama"
[data]
max_length = 24
private = { generator = "records", size = 16, seed = 1 }
shadow = { generator = "records", size = 8, seed = 2 }
held_out = 8
%s
[training]
strategy = "per_client"
clients = 2
steps = 2
batch_size = 4
"""
CANARIES = "canaries = { count = 2, repeats = [1, 4] }"


@pytest.fixture
def with_canaries(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG % CANARIES)
    return path


@pytest.fixture
def without_canaries(tmp_path):
    path = tmp_path / "n.toml"
    path.write_text(CONFIG % "")
    return path


def test_attack_runs_membership_and_extraction_on_the_threats_view(with_canaries, capsys):
    assert main(["attack", "--config", str(with_canaries), "--threat", "model_user", "--attack", "membership"]) == 0
    out = capsys.readouterr().out
    assert "view: released_model" in out and "canary victim: client 1" in out
    assert "membership (reference, 8 members, 8 non-members): AUC 0." in out and "TPR@0.1% FPR" in out
    assert main(["attack", "--config", str(with_canaries), "--threat", "adapter_thief", "--attack", "extraction",
                 "--param", "beams=2"]) == 0
    out = capsys.readouterr().out
    assert "view: server_adapters" in out and "extracted verbatim 0.00 [0.00, " in out and "1x: " in out


def test_attack_runs_membership_without_canaries(without_canaries, capsys):
    assert main(["attack", "--config", str(without_canaries), "--threat", "model_user", "--attack", "membership",
                 "--param", "signal='loss'"]) == 0
    assert "membership (loss, 8 members, 8 non-members)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--threat", "model_user", "--attack", "canary_exposure"],
     "canary_exposure is scored on canaries and the run has none: add [data] canaries"),
    (["--threat", "adapter_thief", "--attack", "extraction"],
     "extraction is scored on canaries and the run has none"),
    (["--threat", "eavesdropper", "--attack", "membership"], "which threat 'eavesdropper' does not grant"),
    (["--threat", "adapter_thief", "--attack", "membership", "--param", "view='released_model'"],
     "threat 'adapter_thief' does not grant the view 'released_model'; use view = 'auto' or one of server_adapters"),
    (["--threat", "model_user", "--attack", "membership", "--param", "view='weights'"], "view must be 'auto' or one of"),
    (["--threat", "model_user", "--attack", "membership", "--capture", "x.bin"], "membership reads a trained model, "
     "not traffic: drop --capture"),
])
def test_attack_refuses_what_cannot_run_in_one_line(without_canaries, capsys, argv, needle):
    assert main(["attack", "--config", str(without_canaries), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("splitleak: error: ")
