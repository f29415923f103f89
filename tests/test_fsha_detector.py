"""Hijacking is flagged within a few steps; honest training never is."""

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import ATTACKS, Attack, AttackConfig, Reconstruction, ServerPolicy
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import Capability, get_threat


def _cfg(steps, finetune="lora"):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 4, "finetune": finetune},
    })


class _Critic(ServerPolicy):
    """What FSHA sends the head: the gradient of a discriminator's score — here a fixed random linear critic
    on the features, consistent over steps and unrelated to the client's task."""

    def __init__(self, hidden: int):
        self.w = torch.randn(hidden, generator=torch.Generator().manual_seed(3))

    def head_gradient(self, client_ids, step, hidden_in, attention_mask, honest_grad):
        return self.w.expand_as(honest_grad) * attention_mask.unsqueeze(-1) * honest_grad.abs().mean()


class _SyntheticHijack(Attack):
    requires = frozenset({Capability.CONTROL_SERVER})
    active = True
    Config = AttackConfig

    def server_policy(self, obs):
        return _Critic(64)

    def reconstruct(self, obs):
        return Reconstruction(torch.empty(0, 0, dtype=torch.long), (), note="synthetic")


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def test_honest_training_is_never_flagged(base):
    detector = make_defense("fsha_detector")
    train_split(_cfg(60), SplitSpec(1, 1), base, defense=detector)
    assert detector.report()["detected"] is False and detector.steps_seen >= 120


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_synthetic_hijacking_is_flagged_within_20_steps(base, finetune):
    detector = make_defense("fsha_detector")
    train_split(_cfg(30, finetune), SplitSpec(1, 1), base, get_threat("malicious_server"), _SyntheticHijack(),
                detector)
    report = detector.report()
    assert report["detected"] and report["detected_at_step"] < 20
    assert report["clients_alarmed"] == [0, 1]


def test_real_fsha_is_flagged_within_20_steps(base):
    from suite.interfaces.attack import make_attack

    assert "fsha" in ATTACKS.names()  # registered: this test runs, it never skips
    threat = get_threat("malicious_server")
    detector = make_defense("fsha_detector")
    train_split(_cfg(25, "full"), SplitSpec(1, 1), base, threat, make_attack("fsha", threat), detector)
    assert detector.report()["detected"] and detector.report()["detected_at_step"] < 20
