"""`splitleak list` prints what is registered, one line each; a wrong name anywhere gets a "did you mean"."""

import pytest

from suite.cli import main
from suite.interfaces.attack import ATTACKS
from suite.interfaces.defense import DEFENSES
from suite.interfaces.presets import THREATS
from suite.registry import did_you_mean, one_line, summary_of


def _listed(out: str) -> dict[str, dict[str, str]]:
    """The list output as {kind: {name: summary}}."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), {})
        elif line.strip():
            name, summary = line.strip().split(maxsplit=1)
            current[name] = summary
    return sections


def test_list_prints_every_registered_name_with_one_line(capsys):
    assert main(["list"]) == 0
    listed = _listed(capsys.readouterr().out)
    assert list(listed) == ["attacks", "defenses", "threats", "models"]
    assert set(listed["attacks"]) == set(ATTACKS.names())
    assert set(listed["defenses"]) == set(DEFENSES.names())
    assert {name.split(":")[0] for name in listed["threats"]} == set(THREATS)
    assert "curious_stage:i" in listed["threats"] and "colluding_stages:i,j" in listed["threats"]
    assert {"smollm2-135m", "gemma3-270m", "tiny-llama", "llama-1b"} <= set(listed["models"])
    for kind in listed.values():
        for summary in kind.values():
            assert summary and len(summary) <= 100
    assert listed["defenses"]["none"] == "The undefended baseline: plaintext channel, nothing added."
    assert listed["attacks"]["nearest_embedding"].startswith("Nearest-embedding inversion")


def test_list_one_kind(capsys):
    assert main(["list", "threats"]) == 0
    assert list(_listed(capsys.readouterr().out)) == ["threats"]


def test_summary_is_the_summary_attribute_else_the_docstring_first_sentence():
    class Documented:
        """Does one thing. Then explains more."""

    class Summarised(Documented):
        summary = "said here"

    assert summary_of(Documented) == "Does one thing."
    assert summary_of(Summarised) == "said here"
    assert one_line("a " * 80, width=20) == "a a a a a a a a a…"
    assert did_you_mean("nearest_embeding", ATTACKS.names()) == "; did you mean 'nearest_embedding'?"
    assert did_you_mean("zzzz", ATTACKS.names()) == ""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["attack", "--model", "tiny-llama", "--threat", "curious_sever", "--attack", "nearest_embedding"],
         "unknown threat 'curious_sever'; did you mean 'curious_server'?"),
        (["attack", "--model", "tiny-llama", "--threat", "curious_server", "--attack", "nearest_embeding"],
         "unknown attack 'nearest_embeding'; did you mean 'nearest_embedding'?"),
        (["attack", "--model", "tiny-llama", "--threat", "curious_server", "--attack", "nearest_embedding",
          "--defense", "dp_gausian"], "unknown defense 'dp_gausian'; did you mean 'dp_gaussian'?"),
        (["train", "--model", "tiny-lama", "--steps", "1"], "did you mean 'tiny-llama'?"),
    ],
)
def test_a_wrong_name_on_the_command_line_gets_did_you_mean(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitleak: error: ") and needle in err[-1]


def test_a_misspelt_named_model_gets_did_you_mean(capsys, monkeypatch):
    def no_hub(*args, **kwargs):
        raise OSError("smollm2-13m is not a local folder and is not a valid model identifier")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_hub)  # never ask the hub in a test
    assert main(["train", "--model", "smollm2-13m", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitleak: error: model 'smollm2-13m'")
    assert err[-1].endswith("; did you mean 'smollm2-135m'?")


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[training]\nstratgy = 'serial'\n", "training.stratgy: unknown key; did you mean 'strategy'?"),
        ("[training]\nstrategy = 'seral'\n", "did you mean 'serial'?"),
        ("[data]\nprivate = { generatr = 'records' }\n", "data.private.generatr: unknown key; did you mean 'generator'?"),
        ("[matrix]\nthreats = ['eavesdroper']\n", "did you mean 'eavesdropper'?"),
        ("[matrix]\nattacks = ['learned_inversoin']\n", "did you mean 'learned_inversion'?"),
        ("[matrix]\ndefenses = [{ name = 'dxq', eta = 10 }]\n", "did you mean 'dxp'?"),
    ],
)
def test_a_wrong_name_in_a_config_gets_did_you_mean(capsys, tmp_path, toml, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nname = 'tiny-llama'\n" + toml)
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitleak: error: ") and needle in err[0]
