"""The malicious-stage case study harness (suite.harness.pipeline_study) on a tiny model: a tampering stage
changes training where a clean one does not, the targeted perturbation is one fixed direction, and the
divergence step is where the running loss leaves the clean curve."""

import math

import torch

from suite.engine.models import tiny_model
from suite.harness.pipeline_study import divergence_step, run_once
from suite.interfaces.attack import make_attack
from suite.interfaces.threats import get_threat


def test_divergence_step():
    clean = [(4, 5.0), (9, 4.0), (14, 3.0)]
    assert divergence_step(clean, clean) is None
    assert divergence_step([(4, 5.0), (9, 4.5), (14, 3.9)], clean) == 15
    assert divergence_step([(4, 5.0), (9, math.nan), (14, 3.0)], clean) == 10


def test_a_malicious_stage_moves_training_off_the_clean_curve():
    base = tiny_model("llama", num_layers=6)
    clean = run_once(base, 2, 3)
    again = run_once(base, 2, 3)
    assert clean["losses"] == again["losses"] and clean["tampered"] == 0  # the clean run is reproducible
    bad = run_once(base, 2, 3, tamper={"mode": "sign_flip", "target": "both", "rate": 1.0})
    assert bad["stage"] == 1 and bad["tampered"] == 6  # 3 steps, forward and backward
    assert bad["losses"][0] != clean["losses"][0]  # forward tampering shows in the very first loss


def test_targeted_tampering_is_one_fixed_direction():
    policy = make_attack("tampering", get_threat("malicious_stage:0"),
                         {"mode": "targeted", "rate": 1.0, "scale": 0.5}).server_policy(None)
    x = torch.randn(2, 3, 8)
    mask = torch.ones(2, 3)
    shift1 = policy.on_forward([0], 0, x, mask, x) - x
    shift2 = policy.on_forward([0], 1, 2 * x, mask, 2 * x) - 2 * x
    d1 = shift1[0, 0] / shift1[0, 0].norm()
    assert torch.allclose(shift1, shift1[0, 0].expand_as(shift1))  # the same shift at every position
    assert torch.allclose(d1, shift2[1, 2] / shift2[1, 2].norm(), atol=1e-6)  # the same direction every step
    assert torch.isclose(shift1[0, 0].norm(), 0.5 * x.std() * math.sqrt(8))
