"""Second red team (after the first team's fixes): failing until fixed. Each test is the smallest reproducer of
one break of dp_sgd's or transition_audit's claim; the report gives the suggested fixes."""

import dataclasses

import pytest
import torch

from defenses.transition_audit import TransitionAuditDefense
from suite.engine.models import tiny_model
from suite.engine.parties import Batches
from suite.engine.protocol import ActivationMsg, decode, encode
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config


def _cfg(steps: int = 4):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "held_out": 4, "private": {"generator": "records", "size": 8, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 2},
    })


# --- dp_sgd: one record twice in one batch ----------------------------------------------------------


def test_no_batch_holds_a_record_twice():
    """The accountant's sensitivity (clip) assumes a record is at most once in a step's batch. Batches.next
    tops an epoch's remainder up with the next epoch's permutation, so with N % B != 0 a record can be in
    both parts (N=10, B=4: ~7 % of steps); it is then clipped twice and moves the clipped sum by 2 x clip."""
    data = {k: torch.arange(10).unsqueeze(1) for k in ("input_ids", "attention_mask", "labels")}
    batches = Batches(data, 4, seed=0)
    batches.distinct = True  # what dp_sgd sets on every client (tests/test_dp_sgd.py checks it does)
    for _ in range(200):
        ids = batches.next().input_ids.reshape(-1).tolist()
        assert len(ids) == len(set(ids)), ids


# --- transition_audit: evidence the party controls ----------------------------------------------------


def _scale_activations(msg):
    """An inbox tap (a plain function): edits the received activations in place."""
    if isinstance(msg, ActivationMsg):
        msg.hidden.mul_(1.5)


class _EditsItsInputs(TransitionAuditDefense):
    """The audited server computes on inputs it edited; the recorder keeps a reference to the edited message."""

    def install(self, session) -> None:
        session.server.inbox_taps.append(_scale_activations)
        super().install(session)


class _Wire:
    """The party's own transport: adds 3 to the hidden states it sends a client, after the recorder saw them."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, src, dst, data):
        msg = decode(data)
        if isinstance(msg, ActivationMsg) and dst.startswith("client"):
            data = encode(dataclasses.replace(msg, hidden=msg.hidden + 3.0))
        self.inner.send(src, dst, data)


class _TampersOnTheWire(TransitionAuditDefense):
    def install(self, session) -> None:
        super().install(session)
        session.server.transport = _Wire(session.server.transport)


@pytest.mark.parametrize("audit_cls", [_EditsItsInputs, _TampersOnTheWire])
def test_tampering_outside_the_recorded_messages_is_caught_at_rate_1(audit_cls):
    audit = audit_cls(audit_cls.Config(rate=1.0, act=False))
    train_split(_cfg(), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert audit.report()["audited"] > 0
    assert audit.flags  # today: every transition audited, none flagged


class _WireAndFrozenDrift(TransitionAuditDefense):
    """Tampers on the wire and through an inbox tap, and scales a frozen weight at pass 3 (caught)."""

    def install(self, session) -> None:
        super().install(session)
        party = self.party = session.server
        party.transport = _Wire(party.transport)
        party.inbox_taps.append(_scale_activations)
        recorded, calls = party.forward, [0]

        def forward(ids, step):
            calls[0] += 1
            if calls[0] == 3:
                with torch.no_grad():
                    next(p for p in party.trunk.parameters() if not p.requires_grad and p.dim() == 2).mul_(1.5)
            recorded(ids, step)

        party.forward = forward


def test_the_standby_keeps_nothing_of_the_excluded_party():
    audit = _WireAndFrozenDrift(_WireAndFrozenDrift.Config(rate=1.0))
    train_split(_cfg(), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert audit.replacements
    assert not isinstance(audit.party.transport, _Wire)  # today: the standby sends through the party's wire
    assert _scale_activations not in audit.party.inbox_taps  # today: and still edits its inputs


def test_a_resumed_audit_missing_a_stage_is_a_one_line_error():
    from suite.errors import SplitleakError

    audit = TransitionAuditDefense(TransitionAuditDefense.Config(rate=1.0), verified={})
    with pytest.raises(SplitleakError):  # today: KeyError: 0
        train_split(_cfg(), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
