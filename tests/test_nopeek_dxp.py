"""NoPeek's distance correlation and DxP's embedding noise, alone and in a training run."""

import pytest
import torch

from defenses.dxp import dx_noise
from defenses.nopeek import distance_correlation
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 6, "batch_size": 4, "lr": 0.01},
})


def test_distance_correlation_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, generator=g)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-6)
    # The sample statistic is biased upwards for finite n (~0.14 here); dependence scores far higher.
    independent = float(distance_correlation(x, torch.randn(1000, 5, generator=g)))
    dependent = float(distance_correlation(x, x + torch.randn(1000, 5, generator=g)))
    assert independent < 0.2 and dependent > 0.6
    y = x.clone().requires_grad_(True)
    distance_correlation(x, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_dx_noise_has_the_gamma_magnitude():
    eta, hidden = 10.0, 64
    z = dx_noise(torch.Size([4000, hidden]), eta, torch.Generator().manual_seed(0))
    norms = z.norm(dim=-1)
    assert float(norms.mean()) == pytest.approx(hidden / eta, rel=0.02)  # Gamma(H, 1/eta) mean
    assert float(norms.var()) == pytest.approx(hidden / eta**2, rel=0.1)
    assert abs(float(z.mean())) < 0.01  # no preferred direction


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def test_nopeek_adds_a_penalty_that_trains_the_head(base):
    trained = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("nopeek", {"alpha": 5.0}))
    report = trained.defense.report()
    assert report["dcor_first"] > 0 and report["dcor_last10_mean"] < report["dcor_first"]


def test_dxp_reduces_nearest_embedding_leakage_at_k0(base):
    threat = get_threat("curious_server")
    attack = make_attack("nearest_embedding", threat)
    plain = attack_trained(train_split(CFG, SplitSpec(0, 1), base), threat, attack, CFG).metrics
    trained = train_split(CFG, SplitSpec(0, 1), base, defense=make_defense("dxp", {"eta": 20.0}))
    noisy = attack_trained(trained, threat, attack, CFG).metrics
    assert plain.token_accuracy > 0.99 and noisy.token_accuracy < 0.5
    assert trained.defense.report()["mean_noise_norm"] == pytest.approx(64 / 20.0, rel=0.1)


@pytest.mark.parametrize(("name", "params"), [("nopeek", {"alpha": -1}), ("dxp", {"eta": 0})])
def test_bad_parameters(name, params):
    with pytest.raises(ConfigError):
        make_defense(name, params)
