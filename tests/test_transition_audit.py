"""The transition audit (defenses/transition_audit.py, suite.engine.transitions): an honest party is never
flagged; a party that trains its weights toward its own goal and computes honestly with them (the case
an outside review found, at S = 1) is caught, where the integrity audit of outputs is not; a tampering stage among four
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


# --- what the party cannot choose: which passes are audited, its first state, its frozen part -----------


def _audit_with(install_party, config: dict):
    """A transition audit whose audited server runs ``install_party(audit, session, party)`` once the audit is
    installed (the party's own code: it may wrap its methods, set a policy, change its modules)."""
    from defenses.transition_audit import TransitionAuditDefense

    class Audit(TransitionAuditDefense):
        def install(self, session) -> None:
            super().install(session)
            install_party(self, session, session.server)

    return Audit(Audit.Config(**config))


class _UpdateFreeTamper:
    """A policy that, on the passes the orchestrator runs update-free (the traffic capture), shifts what it
    returns (``shift``) or moves a trainable weight inside the pass, after its backward (``drift``)."""

    def __init__(self, session, party, how: str):
        self.session, self.party, self.how, self.tampered = session, party, how, 0

    def on_forward(self, ids, step, hidden, mask, out):
        if self.session.updates or self.how != "shift":
            return out
        self.tampered += 1
        return out + 3.0

    def on_update(self, *args):
        pass

    def head_gradient(self, ids, step, hidden, mask, grad):  # after the pass's backward
        if not self.session.updates and self.how == "drift":
            import torch

            self.tampered += 1
            with torch.no_grad():
                next(p for p in self.party.trunk.parameters() if p.requires_grad).add_(0.01)
        return grad


@pytest.mark.parametrize("how", ["shift", "drift"])
def test_update_free_passes_are_replayed_and_may_not_change_the_state(how):
    def install(audit, session, party):
        party.policy = audit.policy = _UpdateFreeTamper(session, party, how)

    audit = _audit_with(install, {"rate": 1.0, "act": False})
    train_split(_cfg(1, strategy="serial"), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    r = audit.report()
    assert audit.policy.tampered > 0 and r["update_free_transitions"] > 0
    assert r["flagged"] and all(not f["training"] for f in audit.flags)  # only the tampered (capture) passes
    if how == "drift":  # caught on every such pass without a replay: its state changed where none may
        assert r["flagged"] == audit.policy.tampered
    else:
        assert all(f["message_difference"] >= 3.0 for f in audit.flags)


def test_an_audit_that_checked_nothing_says_so():
    audit = make_defense("transition_audit", {"rate": 0.0})
    train_split(_cfg(1, steps=2), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    r = audit.report()
    assert r["transitions"] == 2 and r["audited"] == 0 and "checked nothing" in r["warning"]
    assert "warning" not in _honest_report(rate=1.0)


def _honest_report(rate: float) -> dict:
    audit = make_defense("transition_audit", {"rate": rate})
    train_split(_cfg(1, steps=1), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    return audit.report()


def test_nan_is_a_difference():
    import torch

    from suite.engine.protocol import TO_CLIENT, ActivationMsg
    from suite.engine.transitions import Snapshot, difference, messages_differ, within

    x = torch.zeros(1, 2, 4)
    bad = x.clone()
    bad[0, 1, 3] = float("nan")
    ok = [("server", "client/0", ActivationMsg(0, 1, TO_CLIENT, x))]
    nan = [("server", "client/0", ActivationMsg(0, 1, TO_CLIENT, bad))]
    assert messages_differ(ok, ok) == 0.0 and within(messages_differ(ok, ok), 0.0)
    assert not within(messages_differ(ok, nan), 1e9) and not within(messages_differ(nan, ok), 1e9)
    assert within(messages_differ(nan, nan), 0.0)  # the same NaN in the same place: the same message
    a, b = Snapshot({"w": torch.zeros(3), "v": x}, {}), Snapshot({"w": torch.zeros(3), "v": bad}, {})
    assert not within(difference(a, b), 1e9) and not within(difference(b, a), 1e9)


def _frozen(trunk):
    return next(p for n, p in trunk.named_parameters() if not p.requires_grad and "lora_" not in n and p.dim() == 2)


@pytest.mark.parametrize("what", ["frozen", "adapters"])
def test_a_party_that_arrives_with_a_non_public_state_is_caught_at_its_first_step_and_replaced_clean(what):
    import torch

    from defenses.transition_audit import TransitionAuditDefense

    class Arrives(TransitionAuditDefense):
        def install(self, session) -> None:
            trunk = session.server.trunk
            self.public_weight = _frozen(trunk).detach().clone()
            with torch.no_grad():
                if what == "frozen":
                    _frozen(trunk).mul_(1.5)
                else:
                    for n, p in trunk.named_parameters():
                        if "lora_B" in n:
                            p.normal_(0, 0.5)
            super().install(session)

    audit = Arrives(Arrives.Config(rate=0.0))  # no replay: the chain from the public state catches it
    trained = train_split(_cfg(1, strategy="serial"), SplitSpec(1, 1), tiny_model("llama"), defense=audit,
                          reference=False)
    assert [(f["transition"], f["start_mismatch"]) for f in audit.flags] == [(0, True)]
    assert audit.replacements[0]["resumed_from"] == -1  # the public initial state
    server = trained.prepared.session.server
    assert torch.equal(_frozen(server.trunk), audit.public_weight)  # the standby holds the public weights


def test_without_a_kept_public_build_the_first_state_is_reported_as_the_partys_word():
    from suite.experiment.prepared import prepare

    prepared = prepare(_cfg(1), SplitSpec(1, 1), loaded=tiny_model("llama"))
    audit = make_defense("transition_audit", {"rate": 1.0})
    audit.install(prepared.session)
    assert "not attested" in audit.report()["initial_state"]
    kept = prepare(_cfg(1), SplitSpec(1, 1), loaded=tiny_model("llama"), keep_public=True)
    audit = make_defense("transition_audit", {"rate": 1.0})
    audit.install(kept.session)
    assert audit.report()["initial_state"] == "public build"


@pytest.mark.parametrize("what", ["frozen", "scaling"])
def test_a_frozen_weight_or_a_setting_changed_between_steps_is_caught_at_its_next_step_at_any_rate(what):
    import torch

    seen = {}

    def install(audit, session, party):
        recorded, calls = party.forward, [0]
        seen["weight"] = _frozen(party.trunk).detach().clone()
        seen["scaling"] = {n: dict(m.scaling) for n, m in party.trunk.named_modules() if hasattr(m, "scaling")
                           and isinstance(m.scaling, dict)}

        def forward(ids, step):
            calls[0] += 1
            if calls[0] == 3:  # between its 2nd and 3rd pass, outside any transition
                with torch.no_grad():
                    if what == "frozen":
                        _frozen(party.trunk).mul_(1.5)
                    else:
                        for m in party.trunk.modules():
                            if isinstance(getattr(m, "scaling", None), dict):
                                for k in m.scaling:
                                    m.scaling[k] *= 4.0
            recorded(ids, step)

        party.forward = forward

    audit = _audit_with(install, {"rate": 0.0})  # no replay at all: the commitment chain catches it
    trained = train_split(_cfg(1, steps=4, strategy="serial"), SplitSpec(1, 1), tiny_model("llama"),
                          defense=audit, reference=False)
    assert [(f["transition"], f["start_mismatch"]) for f in audit.flags] == [(2, True)]
    (swap,) = audit.replacements
    assert swap["resumed_from"] == -1  # nothing was replayed, so nothing past the public state is verified
    trunk = trained.prepared.session.server.trunk  # the standby: a fresh party from the public build
    assert torch.equal(_frozen(trunk), seen["weight"])
    assert {n: dict(m.scaling) for n, m in trunk.named_modules() if isinstance(getattr(m, "scaling", None), dict)
            } == seen["scaling"]


def test_a_resumed_audit_starts_from_the_last_verified_states_never_the_partys_word():
    import torch

    from defenses.transition_audit import TransitionAuditDefense
    from suite.engine.training import train
    from suite.errors import ConfigError
    from suite.experiment.prepared import prepare

    prepared = prepare(_cfg(1, steps=2, strategy="serial"), SplitSpec(1, 1), loaded=tiny_model("llama"),
                       keep_public=True)
    first = make_defense("transition_audit", {"rate": 1.0})
    first.install(prepared.session)
    train(prepared.session)
    assert first.report()["flagged"] == 0
    with pytest.raises(ConfigError, match="already trained 2 steps"):  # the public build is not where it is
        make_defense("transition_audit", {"rate": 1.0}).install(prepared.session)
    # the checkpoint: the audit's verified states; the party then arrives with its adapters moved
    with torch.no_grad():
        next(p for n, p in prepared.session.server.trunk.named_parameters() if "lora_B" in n).add_(0.1)
    resumed = TransitionAuditDefense(TransitionAuditDefense.Config(rate=1.0), verified=first.verified_states())
    resumed.install(prepared.session)
    train(prepared.session, steps=1)
    assert [(f["transition"], f["start_mismatch"]) for f in resumed.flags] == [(0, True)]
    assert resumed.report()["initial_state"] == "last verified states (resumed)"


def test_the_report_shows_an_audit_that_checked_nothing():
    import json

    import pandas as pd

    from reports.pipeline import detection_table

    checked = {"audited": 3, "transitions": 8, "flagged": 0, "replacements": []}
    nothing = {"audited": 0, "transitions": 0, "flagged": 0, "replacements": [],
               "warning": "0 training transitions recorded, 0 audited: the audit checked nothing"}
    df = pd.DataFrame([{"ok": True, "defense": "transition_audit", "threat_label": "t", "attack_label": "a",
                        "defense_label": "d", "stages": 2, "defense_report": json.dumps(r)} for r in (checked, nothing)])
    table = detection_table(df)
    assert table["warning"].isna().tolist() == [True, False]


def test_a_stage_whose_frozen_weight_changed_is_replaced_by_a_fresh_stage_the_chain_evaluates_with():
    import torch

    def install(audit, session, chain):
        stage = chain.stages[1]
        recorded, calls = stage.forward, [0]

        def forward(ids, step):
            calls[0] += 1
            if calls[0] == 2:
                with torch.no_grad():
                    _frozen(stage.trunk).mul_(1.5)
            recorded(ids, step)

        stage.forward = forward
        audit.weight = _frozen(stage.trunk).detach().clone()

    audit = _audit_with(install, {"rate": 0.0})
    trained = train_split(_cfg(2, steps=3), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert [(f["stage"], f["transition"], f["start_mismatch"]) for f in audit.flags] == [(1, 1, True)]
    chain = trained.prepared.session.server
    assert chain.trunk.parts[1] is chain.stages[1].trunk  # evaluation without the wire uses the standby
    assert torch.equal(_frozen(chain.stages[1].trunk), audit.weight)


def _resume_setup():
    from suite.engine.training import train
    from suite.experiment.prepared import prepare

    prepared = prepare(_cfg(1, steps=2, strategy="serial"), SplitSpec(1, 1), loaded=tiny_model("llama"),
                       keep_public=True)
    first = make_defense("transition_audit", {"rate": 1.0})
    first.install(prepared.session)
    train(prepared.session)
    return prepared, first


def test_a_resume_accepts_only_the_audits_own_signed_record_of_every_stage():
    import torch

    from defenses.transition_audit import TransitionAuditDefense, VerifiedStates
    from suite.engine.transitions import snapshot
    from suite.errors import ConfigError

    prepared, first = _resume_setup()
    server = prepared.session.server

    def resume(verified):
        TransitionAuditDefense(TransitionAuditDefense.Config(rate=1.0), verified=verified).install(prepared.session)

    with torch.no_grad():  # the party's own adapters, handed in as "the checkpoint's verified state"
        next(p for n, p in server.trunk.named_parameters() if "lora_B" in n).normal_(0, 0.5)
    with pytest.raises(ConfigError, match="must be the earlier audit's verified_states"):
        resume({0: snapshot(server)})
    with pytest.raises(ConfigError, match=r"no verified state for stage\(s\) \[0\]"):
        resume(VerifiedStates({}))
    record = first.verified_states()
    forged = VerifiedStates({0: snapshot(server)})
    own = dict(forged.digests)
    forged.digests, forged.signature = record.digests, record.signature  # the audit's signature, another state
    with pytest.raises(ConfigError, match="changed after the audit verified it"):
        resume(forged)
    record = first.verified_states()
    record.digests = own  # a digest swapped into the audit's record
    with pytest.raises(ConfigError, match="not signed by an audit"):
        resume(record)
    resume(first.verified_states())  # the audit's own record, as it returned it


def test_a_class_patched_in_process_or_a_hook_on_the_public_copy_is_flagged():
    """The replica shares code with the party in process: a change to it is flagged (and the report says
    the verdicts from there are void), never a clean replay of tampered outputs."""
    from suite.engine.split import ServerTrunk

    honest = ServerTrunk.forward

    class Patches(type(make_defense("transition_audit", {}))):
        def install(self, session):
            super().install(session)

            def forward(self_, *a, **k):
                return honest(self_, *a, **k) * 1.5 + 0.25

            ServerTrunk.forward = forward

    audit = Patches(Patches.Config(rate=1.0, act=False))
    try:
        train_split(_cfg(1), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    finally:
        ServerTrunk.forward = honest
    r = audit.report()
    assert [f["transition"] for f in audit.flags] == [0] and audit.flags[0]["shared_code_changed"]
    assert r["shared_code_changed"] and "void" in r["warning"]

    class Hooks(type(make_defense("transition_audit", {}))):
        def install(self, session):
            super().install(session)
            public = self.parties[0][3].trunk
            public.blocks.layers[0].register_forward_hook(lambda m, i, o: o)

    audit = Hooks(Hooks.Config(rate=1.0, act=False))
    train_split(_cfg(1), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert audit.flags and audit.flags[0]["shared_code_changed"]


def test_a_stage_that_edits_its_inputs_or_its_replies_on_its_own_transport_is_caught():
    """In a pipeline the evidence is the bytes on the orchestrator's link too: a middle stage's own transport
    that edits what it sends the next stage, or an inbox tap that edits what it received, is flagged, and its
    standby keeps neither (the chain's own taps stay)."""
    import dataclasses

    from suite.engine.protocol import ActivationMsg, decode, encode
    from suite.engine.stages import StageChain

    class Wire:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def send(self, src, dst, data):
            msg = decode(data)
            if isinstance(msg, ActivationMsg):
                data = encode(dataclasses.replace(msg, hidden=msg.hidden * 1.01))
            self.inner.send(src, dst, data)

    def edit(msg):
        if isinstance(msg, ActivationMsg):
            msg.hidden.add_(0.01)

    base = type(make_defense("transition_audit", {}))
    for how in ("wire", "tap"):
        class Stage1(base):
            def install(self, session, how=how):
                super().install(session)
                stage = session.server.stages[1]
                if how == "wire":
                    stage.transport = Wire(stage.transport)
                else:
                    stage.inbox_taps.append(edit)
                self.chain = session.server

        audit = Stage1(Stage1.Config(rate=1.0))
        train_split(_cfg(3), SplitSpec(1, 1), tiny_model("llama", num_layers=5), defense=audit, reference=False)
        assert {f["stage"] for f in audit.flags} == {1} and audit.replacements, how
        chain: StageChain = audit.chain
        stage = chain.stages[1]
        assert stage.transport is chain.stages[0].transport and edit not in stage.inbox_taps
        assert chain.stages[0].inbox_taps[0] == chain._from_heads


@pytest.mark.parametrize("what", ["frozen", "adapter"])
def test_a_write_around_the_version_counter_between_steps_is_caught_at_rate_0(what):
    """The before-state is the last after-state only when the party holds exactly it: its trainable weights
    and optimiser states compared by value, its frozen weights by version and compared in full at every
    after-state (a rotating share of them by value). A write through ``.data`` (no version bump) is caught
    without any replay."""
    from suite.engine.transitions import PublicFixed

    def install(audit, session, party):
        recorded, calls = party.forward, [0]

        def forward(ids, step):
            calls[0] += 1
            if calls[0] == 3:
                if what == "frozen":
                    _frozen(party.trunk).data.mul_(1.5)
                else:
                    next(p for n, p in party.trunk.named_parameters() if "lora_B" in n).data.add_(0.1)
            recorded(ids, step)

        party.forward = forward

    audit = _audit_with(install, {"rate": 0.0, "act": False})
    train_split(_cfg(1, steps=4, strategy="serial"), SplitSpec(1, 1), tiny_model("llama"), defense=audit,
                reference=False)
    first = audit.flags[0]["transition"]
    # an adapter at the next step (compared by value); a frozen weight within PublicFixed.ROTATION transitions
    assert first == 2 if what == "adapter" else 2 <= first < 2 + PublicFixed.ROTATION
    assert audit.report()["extra_compute_measured"] > 0


def test_a_party_replaced_during_the_traffic_capture_keeps_the_captures_own_taps():
    """A standby made in an update-free pass (the capture) keeps the orchestrator's inbox taps (the
    capture's, which it removes when done) and drops the party's; the capture then ends cleanly."""
    from suite.engine.protocol import ActivationMsg

    def install(audit, session, party):
        def edit(msg):
            if isinstance(msg, ActivationMsg) and not session.updates:  # only while the traffic is captured
                msg.hidden.mul_(1.5)

        party.inbox_taps.append(edit)
        audit.edit = edit

    audit = _audit_with(install, {"rate": 1.0})
    trained = train_split(_cfg(1, steps=2, strategy="serial"), SplitSpec(1, 1), tiny_model("llama"),
                          defense=audit, reference=False)
    assert audit.replacements and all(not f["training"] for f in audit.flags)
    assert audit.edit not in trained.prepared.session.server.inbox_taps
