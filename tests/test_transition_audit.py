"""The transition audit (defenses/transition_audit.py, suite.engine.transitions): an honest party is never
flagged; a party that trains its weights toward its own goal and computes honestly with them (issue 27's
outside read, at S = 1) is caught, where the integrity audit of outputs is not; a tampering stage among four
is caught, excluded and replaced by a standby from its last verified state."""

import random

import pytest

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat


def _cfg(stages: int, steps: int = 4, strategy: str = "batch_parallel"):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "held_out": 4, "private": {"generator": "records", "size": 8, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 2, "stages": stages, "strategy": strategy},
    })


@pytest.mark.parametrize(("stages", "strategy"), [(1, "serial"), (2, "batch_parallel"), (4, "per_client")])
def test_an_honest_party_is_never_flagged(stages, strategy):
    audit = make_defense("transition_audit", {"rate": 1.0})
    train_split(_cfg(stages, strategy=strategy), SplitSpec(0, 0), tiny_model("llama"), defense=audit, reference=False)
    r = audit.report()
    passes = 4 * (2 if strategy != "batch_parallel" else 1)  # server passes per party in training
    assert r["transitions"] == passes * stages and r["audited"] == r["transitions"]
    assert r["flagged"] == 0 and r["extra_compute"] == pytest.approx(1.0)


def _state_attack(rate: float = 0.5, threat: str = "malicious_server"):
    t = get_threat(threat)
    return t, make_attack("tampering", t, {"target": "none", "state": True, "rate": rate, "scale": 0.5})


def test_at_one_server_training_toward_its_own_goal_is_caught_where_the_output_audit_is_not():
    threat, attack = _state_attack()
    audit = make_defense("transition_audit", {"rate": 1.0, "act": False})
    train_split(_cfg(1), SplitSpec(1, 1), tiny_model("llama"), threat, attack, audit, reference=False)
    tampered = sorted(s for s, what in attack.policy.tampered if what == "state")
    assert tampered
    assert audit.flagged_steps() == set(tampered)  # every tampered step, and no other
    assert all(f["state_difference"] > 0 for f in audit.flags)

    threat, attack = _state_attack()
    outputs = make_defense("integrity_audit", {"audit_rate": 1.0})
    train_split(_cfg(1), SplitSpec(1, 1), tiny_model("llama"), threat, attack, outputs, reference=False)
    assert attack.policy.tampered and not outputs.flags  # its outputs follow from its committed weights


def test_a_tampering_stage_is_caught_excluded_and_replaced_from_its_last_verified_state():
    threat = get_threat("malicious_stage:2")
    attack = make_attack("tampering", threat, {"target": "hidden", "mode": "scaled_noise", "rate": 0.5,
                                               "scale": 0.01, "seed": 3})
    audit = make_defense("transition_audit", {"rate": 1.0, "stage": 2})
    trained = train_split(_cfg(4, steps=6), SplitSpec(0, 0), tiny_model("llama"), threat, attack, audit,
                          reference=False)
    first = min(s for s, _ in attack.policy.tampered)
    assert [f["step"] for f in audit.flags] == [first]  # caught at its first tampered step, then replaced
    (swap,) = audit.replacements
    assert swap["stage"] == 2 and swap["steps_lost"] == swap["at_transition"] - swap["resumed_from"] == 1
    assert trained.prepared.session.server.stages[2].policy is None
    assert audit.report()["audited"] == 6  # the standby's later transitions all pass


def test_sampling_audits_about_rate_of_the_transitions():
    audit = make_defense("transition_audit", {"rate": 0.25, "seed": 1})
    train_split(_cfg(2, steps=20), SplitSpec(0, 0), tiny_model("llama"), defense=audit, reference=False)
    r = audit.report()
    draws = random.Random(1)
    assert r["transitions"] == 40 and r["audited"] == sum(draws.random() < 0.25 for _ in range(40)) > 0
    assert r["flagged"] == 0
    assert r["extra_compute_trunk"] == pytest.approx(r["audited"] / 20 / 2)


def _drifting_audit(config: dict, at_forward: int):
    """A transition audit whose audited server changes its weights before its ``at_forward``-th forward (between
    two steps, outside any recorded transition) and then computes honestly from there."""
    import torch

    from defenses.transition_audit import TransitionAuditDefense

    class Drifting(TransitionAuditDefense):
        def install(self, session) -> None:
            super().install(session)
            party = session.server
            recorded, calls = party.forward, [0]

            def forward(client_ids, step):
                calls[0] += 1
                if calls[0] == at_forward:
                    with torch.no_grad():
                        next(p for p in party.trunk.parameters() if p.requires_grad).add_(0.05)
                recorded(client_ids, step)  # the recorder snapshots the changed state as the step's start

            party.forward = forward

    return Drifting(Drifting.Config(**config))


@pytest.mark.parametrize("act", [False, True])
def test_a_party_that_changes_its_weights_between_steps_and_then_computes_honestly_is_caught(act):
    audit = _drifting_audit({"rate": 1.0, "act": act}, at_forward=3)
    train_split(_cfg(1), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    (flag,) = audit.flags  # caught at that step only (its replay from the changed state is honest)
    assert flag["transition"] == 2 and flag["start_mismatch"] and flag["state_difference"] > 0
    if act:  # the standby resumes from the last verified state and is not flagged afterwards
        (swap,) = audit.replacements
        assert swap["resumed_from"] == 1 and swap["steps_lost"] == 1
    else:
        assert not audit.replacements
