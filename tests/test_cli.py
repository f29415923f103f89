"""The command line: help for every command, one-line errors, and a real (tiny) training run."""

import subprocess
import sys

import pytest

from suite.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "bench"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage: splitleak " + name in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "suite.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "bench" in out.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--model", "./no/such/dir", "--steps", "1"], "no such model"),
        (["train", "--model", "tiny-llama", "-k", "9", "--steps", "1"], "invalid split"),
        (["train", "--config", "/no/such.toml"], "not found"),
        (["train", "--model", "tiny-llama", "--clients", "0"], "training.clients"),
    ],
)
def test_bad_input_is_one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitleak: error: ") and needle in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_unreadable_data_file_is_one_line_error(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[model]\nname='tiny-llama'\n[data]\nprivate={{ path = '{tmp_path / 'missing.csv'}' }}\n")
    assert main(["train", "--config", str(cfg), "--steps", "1"]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_train_on_a_tiny_model_shows_loss_going_down(capsys):
    code = main(["train", "--model", "tiny-gpt2", "--steps", "12", "--lr", "0.01", "--private-size", "24",
                 "--strategy", "batch_parallel"])
    out = capsys.readouterr().out
    assert code == 0
    first, last = (float(x) for x in out.split("train loss")[1].split(":")[1].split("\n")[0].split("->"))
    assert last < first


def test_bench_prints_ratios_and_a_json_line(capsys):
    import json

    assert main(["bench", "--model", "tiny-gpt2", "--reps", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("split_over_centralised", "split_encrypted_over_centralised", "audited_over_split",
                "per_client_state_bytes_8_over_1", "per_client_rss_after_steps_8_over_1"):
        assert result[key] > 0, key
    assert result["trainable_params_central"] == result["trainable_params_split"]  # same fine-tuning method
    assert any("split/centralised" in line for line in lines)


def test_library_warnings_are_silenced_in_cli_processes_and_user_warnings_are_not():
    import warnings

    from suite.engine.quiet import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning,
                               "module.py", 1789, module="torch.nn.modules.module")
        warnings.warn_explicit("Already found a `peft_config`", UserWarning, "tuners_utils.py", 1, module="peft.tuners")
        warnings.warn_explicit("your data has only 3 records", UserWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in caught] == ["your data has only 3 records"]
