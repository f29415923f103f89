"""The TOML config: the README's example loads, and every bad key or value is a one-line error naming it."""

import re
from pathlib import Path

import pytest

from suite.errors import ConfigError
from suite.experiment.config import ExperimentConfig, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README shows an example config"
    return blocks[0]


def test_readme_example_config_loads(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(_readme_example())
    cfg = load_config(path)
    assert cfg.model.name == "smollm2-135m"
    assert cfg.data.private.spec() == {"generator": "records", "size": 64, "seed": 1}
    assert cfg.training.strategy == "serial" and cfg.training.clients == 2 and cfg.training.steps == 30
    assert cfg.matrix.splits == [0, 1, 2]
    assert cfg.matrix.defenses[2] == {"name": "dp_gaussian", "sigma": 0.5, "clip": 1.0}


def test_no_config_is_the_embedded_default():
    assert load_config(None) == ExperimentConfig()


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[training]\nstratgy = 'serial'\n", "training.stratgy: unknown key"),
        ("[training]\nstrategy = 'zigzag'\n", "training.strategy"),
        ("[training]\nclients = 0\n", "training.clients"),
        ("[data]\nmax_length = 1\n", "data.max_length"),
        ("[data]\nprivate = { size = 3 }\n", "data.private"),
        ("[data]\nprivate = { generator = 'records', size = 3, path = 'x.csv' }\n", "data.private"),
        ("[data]\nprivate = { path = 'x.csv', seed = 3 }\n", "data.private"),
        ("[matrix]\nsplits = [-1]\n", "matrix"),
        ("[matrix]\ndefenses = [{ sigma = 1.0 }]\n", "name"),
        ("[modle]\nname = 'x'\n", "modle: unknown key"),
        ("[training\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, toml, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
