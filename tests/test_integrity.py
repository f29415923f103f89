"""A tampering server is caught, step by step, for a few percent of extra compute; honest training never is."""

import pytest

from suite.attack import make_attack
from suite.cell import train_split
from suite.config import parse_config
from suite.defense import make_defense
from suite.models import tiny_model
from suite.split import SplitSpec
from suite.threats import get_threat


def _cfg(steps: int):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 1, "steps": steps, "batch_size": 4},
    })


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def _run(base, steps, attack_params=None, audit=None):
    threat = get_threat("malicious_server")
    attack = make_attack("tampering", threat, attack_params) if attack_params else None
    defense = make_defense("integrity_audit", audit or {})
    trained = train_split(_cfg(steps), SplitSpec(1, 1), base, threat, attack, defense)
    truth = set(attack.policy.tampered) if attack else set()
    return truth, defense.flagged_steps(), defense, trained


def test_honest_training_is_never_flagged(base):
    truth, flagged, defense, trained = _run(base, 100)
    assert flagged == set() and trained.prepared.session.clients[0].rejected_steps == []
    assert defense.report()["extra_compute"] <= 0.10


@pytest.mark.parametrize("target", ["hidden", "gradient"])
@pytest.mark.parametrize("mode", ["sign_flip", "random", "scaled_noise"])
def test_tampering_is_caught_with_high_recall_and_few_false_alarms(base, mode, target):
    truth, flagged, defense, trained = _run(base, 60, {"mode": mode, "target": target, "rate": 0.3, "scale": 0.1})
    assert len(truth) >= 10
    caught = truth & flagged
    false_alarms = flagged - truth
    recall = len(caught) / len(truth)
    steps = len(trained.prepared.session.losses) + 2  # training steps + capture steps
    print(f"{target}/{mode}: recall {recall:.3f}, false alarms {len(false_alarms)} of {steps} steps, "
          f"extra compute {defense.report()['extra_compute']:.3f}")
    assert len(false_alarms) <= 0.01 * steps
    assert defense.report()["extra_compute"] <= 0.10
    assert recall >= 0.99


def test_subtle_gradient_noise_is_caught_by_full_audits(base):
    truth, flagged, defense, _ = _run(base, 30, {"mode": "scaled_noise", "target": "gradient", "rate": 0.3},
                                      {"audit_rate": 1.0})
    assert truth and truth <= flagged
    assert defense.report()["flagged_by"].get("full_audit", 0) >= len(truth)


def test_rejected_steps_do_not_stop_training(base):
    truth, _, _, trained = _run(base, 20, {"mode": "sign_flip", "target": "hidden", "rate": 0.5})
    client = trained.prepared.session.clients[0]
    assert sorted(client.rejected_steps) == sorted(s for s, _ in truth)
    assert len(trained.prepared.session.losses) == 20
