"""A tampering server is caught, step by step, for a few percent of extra compute; honest training never is."""

import copy
import dataclasses

import pytest

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.engine.training import train
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.experiment.prepared import prepare
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat


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


def _cost_bound(steps: int, audit_rate: float = 0.05, spot_share: float = 0.05) -> float:
    """Extra compute the audit may cost: its full audits fall on a CSPRNG schedule (unpredictable, so not
    reproducible in a test), hence the rate plus 4 binomial standard deviations, plus the spot checks."""
    return audit_rate + 4 * (audit_rate * (1 - audit_rate) / steps) ** 0.5 + spot_share


def test_honest_training_is_never_flagged(base):
    truth, flagged, defense, trained = _run(base, 100)
    assert flagged == set() and trained.prepared.session.clients[0].rejected_steps == []
    assert defense.report()["extra_compute"] <= _cost_bound(len(trained.prepared.session.losses))


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
    assert defense.report()["extra_compute"] <= _cost_bound(steps)
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


class _Trapped:
    """Makes ``server.trunk`` raise when read from the audit's module after install: the verifier may use only
    what crossed the wire (commitments, reveals) and its own replica."""

    @staticmethod
    def arm(server):
        import sys

        cls = type(server)

        class TrappedServer(cls):
            @property
            def trunk(self):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("defenses.integrity_audit"):
                    raise AssertionError("the integrity audit read the live server trunk")
                return self.__dict__["trunk"]

            @trunk.setter
            def trunk(self, value):
                self.__dict__["trunk"] = value

        server.__class__ = TrappedServer


def _run_trapped(base, steps, attack_params, audit):
    """_run, with the trap armed right after the defense is installed."""
    from suite.interfaces.defense import Defense

    threat = get_threat("malicious_server")
    attack = make_attack("tampering", threat, attack_params) if attack_params else None
    defense = make_defense("integrity_audit", audit)
    original = type(defense).install

    def install(self, session):
        original(self, session)
        _Trapped.arm(session.server)

    defense.install = install.__get__(defense, Defense)
    train_split(_cfg(steps), SplitSpec(1, 1), base, threat, attack, defense)
    return (set(attack.policy.tampered) if attack else set()), defense.flagged_steps(), defense


def test_audit_never_reads_the_live_trunk_and_catches_a_plain_tamperer(base):
    truth, flagged, defense = _run_trapped(base, 30, {"mode": "random", "target": "hidden", "rate": 0.3},
                                           {"audit_rate": 0.2})
    assert truth and truth <= flagged
    assert defense.report()["reveals"] >= 30


def test_a_server_that_computes_with_other_weights_than_it_committed_to_is_caught(base):
    """The commitment binds the state: a server that perturbs its live trunk after committing (or commits to
    one state and computes with another) fails the reveal check or the recomputation."""
    from suite.interfaces.attack import ServerPolicy

    class SwapAfterCommit(ServerPolicy):
        def __init__(self):
            self.server = None

        def on_forward(self, client_ids, step, hidden_in, attention_mask, honest_out):
            # the reply is honest for the live weights, but the committed state is changed before any reveal
            committed = self.server._committed[client_ids[0]][1]
            for v in committed.values():
                v.add_(0.5)
            return honest_out

    defense = make_defense("integrity_audit", {"audit_rate": 0.0})
    cfg = _cfg(5)
    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
    prepared = prepare(cfg, SplitSpec(1, 1), loaded=loaded)
    defense.install(prepared.session)
    policy = SwapAfterCommit()
    policy.server = prepared.session.server
    prepared.session.server.policy = policy
    train(prepared.session)
    assert defense.report()["flagged_by"].get("commitment", 0) == 5


def test_the_audit_schedule_is_not_reproducible_from_the_config(base):
    """Two audits with the same public config pick different steps: the server cannot predict them. (Compares
    the audited steps themselves: two 40-step schedules at rate 0.5 coincide with probability 2^-40; their
    counts coincide often, so the count is not the test.)"""
    picks = []
    for _ in range(2):
        _, _, defense, _ = _run(base, 40, None, {"audit_rate": 0.5})
        assert 5 <= len(defense.audited) <= 35  # it audited about half of the 40 steps
        picks.append(list(defense.audited))
    assert picks[0] != picks[1]


def test_adaptive_tamperer_evades_spot_checks_and_is_measured(base):
    """A server that knows spot_tokens tampers only past the checked prefix: the spot check never sees it,
    only full audits catch it, so recall falls from ~1 to about audit_rate. Measured, not hidden."""
    params = {"mode": "random", "target": "hidden", "rate": 1.0}
    plain, plain_flagged, _, _ = _run(base, 40, params, {"audit_rate": 0.25})
    adaptive, adaptive_flagged, defense, _ = _run(base, 40, {**params, "adaptive": True}, {"audit_rate": 0.25})
    recall_plain = len(plain & plain_flagged) / len(plain)
    recall_adaptive = len(adaptive & adaptive_flagged) / len(adaptive)
    print(f"recall plain {recall_plain:.2f}, adaptive {recall_adaptive:.2f}")
    assert recall_plain >= 0.99
    assert 0.05 <= recall_adaptive <= 0.6  # caught by full audits only (audit_rate 0.25)
    assert defense.report()["flagged_by"].get("spot_check", 0) == 0


def test_the_full_audit_schedule_is_revealed_only_after_the_head_gradient(base):
    """A server that watches the reveal requests computes the head gradient honestly on the steps it was asked
    to reveal and scales it (caught by the full audit only: the invariant and the cosine still hold)
    elsewhere. With spot checks off, the old code asked for the reveal when the hidden states arrived,
    before the gradient: this server was never caught. Now the audit is drawn after both replies."""
    from suite.interfaces.attack import ServerPolicy

    defense = make_defense("integrity_audit", {"audit_rate": 0.5, "spot_tokens": 0})
    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
    prepared = prepare(_cfg(30), SplitSpec(1, 1), loaded=loaded)
    server = prepared.session.server
    asked: set[tuple[int, int]] = set()
    honest_reveal = server.reveal

    def watched_reveal(client_id, step):
        asked.add((client_id, step))
        return honest_reveal(client_id, step)

    server.reveal = watched_reveal

    class ScheduleReader(ServerPolicy):
        tampered: set[int] = set()

        def head_gradient(self, client_ids, step, hidden_in, attention_mask, honest_grad):
            if (client_ids[0], step) in asked:
                return honest_grad  # the server knows this step is checked
            self.tampered.add(step)
            return honest_grad * 3.0

    server.policy = policy = ScheduleReader()
    defense.install(prepared.session)
    train(prepared.session)
    audited = {s for _, s in defense.audited}
    assert policy.tampered and audited & policy.tampered  # the server could not avoid the audited steps
    assert audited & policy.tampered <= {s for s, what in defense.flagged_steps() if what == "gradient"}


def _tamper_frozen_and_reveal_it(server, *, adapter=None, drop=False):
    """A malicious server: keeps its honest frozen digest, multiplies a public base weight by 5, and commits to
    (and reveals) the changed tensor as if it were trainable state, so a verifier that loads whatever it is
    revealed recomputes exactly what the server computed."""
    import torch

    from suite.engine import commitment as cm

    trunk = server.trunk
    server._frozen_digest = cm.frozen_digest(trunk)
    name, p = next((n, p) for n, p in trunk.named_parameters() if not cm._is_state(n, p) and "mlp.down_proj" in n)
    with torch.no_grad():
        p.mul_(5.0)

    def evil_commit(ids, steps, honest_adapter):
        state = cm.trainable_state(trunk)
        if drop:
            state.pop(sorted(state)[0])
        else:
            state[name] = p.detach().clone()
        used = adapter if adapter is not None else honest_adapter
        for c in ids:
            server._committed[c] = (steps[c], state, used)
        return cm.digest_tensor(cm.commit(server._frozen_digest, state, used))

    server._commit = evil_commit


@pytest.mark.parametrize("how", [{}, {"adapter": "bogus"}, {"drop": True}])
def test_a_changed_frozen_weight_revealed_as_state_is_caught(base, how):
    """Red team 24.1: a reveal must name exactly the replica's trainable tensors; a frozen weight slipped in
    as 'state' (or a foreign adapter name, or a missing tensor) flags every step."""
    prepared = prepare(_cfg(3), SplitSpec(1, 1), loaded=dataclasses.replace(base, model=copy.deepcopy(base.model)))
    defense = make_defense("integrity_audit", {"audit_rate": 1.0, "spot_tokens": 2})
    defense.install(prepared.session)
    _tamper_frozen_and_reveal_it(prepared.session.server, **how)
    train(prepared.session)
    assert {f["step"] for f in defense.flags} == {0, 1, 2}
    assert all(f["detector"] == "commitment" for f in defense.flags)


def test_the_replica_frozen_weights_are_rechecked_before_a_full_audit(base):
    import torch

    prepared = prepare(_cfg(2), SplitSpec(1, 1), loaded=dataclasses.replace(base, model=copy.deepcopy(base.model)))
    defense = make_defense("integrity_audit", {"audit_rate": 1.0, "spot_tokens": 0})
    defense.install(prepared.session)
    from suite.engine import commitment as cm

    p = next(p for n, p in defense.replica.named_parameters() if not cm._is_state(n, p))
    with torch.no_grad():
        p.mul_(2.0)
    train(prepared.session)
    assert {f["what"] for f in defense.flags} == {"hidden states (the replica's frozen weights changed)"}


def test_a_server_that_agreed_but_does_not_commit_is_flagged_on_every_step(base):
    """Red team 24.2: with no spot checks and no full audit, a reply without a commitment still flags."""
    prepared = prepare(_cfg(4), SplitSpec(1, 1), loaded=dataclasses.replace(base, model=copy.deepcopy(base.model)))
    defense = make_defense("integrity_audit", {"audit_rate": 0.0, "spot_tokens": 0})
    defense.install(prepared.session)
    prepared.session.server.commit_state = False
    train(prepared.session)
    assert {f["step"] for f in defense.flags} == {0, 1, 2, 3}
    assert prepared.session.clients[0].rejected_steps == [0, 1, 2, 3]
