"""The matrix on Ray: the same rows as the serial runner, and the same resume. Needs the `ray` extra."""

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'splitleak[ray]'")

from store_rows import comparable_rows, differences  # noqa: E402

from suite.errors import ConfigError  # noqa: E402
from suite.experiment.config import parse_config  # noqa: E402
from suite.experiment.schedule import run_matrix  # noqa: E402
from suite.experiment.store import ResultsStore  # noqa: E402

MATRIX = {
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 2},
    "matrix": {"splits": [0, 1], "threats": ["curious_server", "malicious_server", "eavesdropper"],
               "attacks": ["nearest_embedding", "wire_inversion"], "defenses": ["none", "encryption"]},
}


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _rows(path):
    return comparable_rows(path)


def test_ray_executor_gives_the_rows_of_the_serial_runner_and_resumes(local_cluster, tmp_path):
    cfg = parse_config(MATRIX)
    serial = run_matrix(cfg, tmp_path / "serial")
    on_ray = run_matrix(cfg, tmp_path / "ray", executor="ray")
    assert on_ray["ran"] == serial["ran"] == on_ray["cells"] == 24  # 12 cells and the blind baseline's 12
    assert not differences(_rows(tmp_path / "ray"), _rows(tmp_path / "serial"))
    # Resume: drop some finished cells; a rerun on Ray computes exactly those again.
    with ResultsStore(tmp_path / "ray") as store:
        store._conn.execute("DELETE FROM cells WHERE head_blocks = 1 AND threat = 'eavesdropper'")
        store._conn.commit()
    again = run_matrix(cfg, tmp_path / "ray", executor="ray")
    assert again["ran"] == 4  # wire_inversion and blind, each under none and encryption
    assert not differences(_rows(tmp_path / "ray"), _rows(tmp_path / "serial"))


def test_unknown_executor_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown executor"):
        run_matrix(parse_config(MATRIX), tmp_path, executor="slurm")
