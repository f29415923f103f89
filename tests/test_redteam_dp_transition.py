"""Red-team findings (failing until fixed): dp_sgd over the network, and three ways past transition_audit.

Each test is the smallest reproducer of one break; see the red-team report for the suggested fixes."""

import pytest
import torch

from defenses.transition_audit import TransitionAuditDefense
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config


def _cfg(steps: int = 4, strategy: str = "serial", size: int = 8):
    return parse_config({
        "model": {"name": "tiny-llama"},
        "data": {"max_length": 12, "held_out": 4, "private": {"generator": "records", "size": size, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": 2, "steps": steps, "batch_size": 2, "strategy": strategy},
    })


# --- dp_sgd in splitleak serve / client ------------------------------------------------------------


def test_serve_with_dp_sgd_on_the_server_trains_its_adapters_under_dp_or_refuses():
    from opacus.optimizers import DPOptimizer

    from suite.errors import SplitleakError
    from suite.net.defended import choose_defense
    from suite.net.parties import build_service

    cfg = _cfg()
    try:
        defense = choose_defense(cfg, "dp_sgd", {"sigma": 1.0, "target": "server"})
        service = build_service(cfg, defense=defense)
    except SplitleakError:
        return  # refused in one line: acceptable
    # today: accepted, labelled dp_sgd, and the server's adapters train with plain AdamW
    assert all(isinstance(o, DPOptimizer) for o in service.server.optimizers.values() if o is not None)


def test_a_networked_client_with_dp_sgd_gets_dp_or_a_one_line_error():
    from suite.errors import SplitleakError
    from suite.interfaces.defense import make_defense
    from suite.net.parties import _prepare

    cfg = _cfg()
    prepared = _prepare(cfg, "client")
    defense = make_defense("dp_sgd", {"sigma": 1.0, "target": "clients"})
    try:
        defense.install_client(prepared.session.clients[0], None)
    except SplitleakError:
        return
    # today: AttributeError '_ClientsOnly' object has no attribute 'config' (a traceback)
    from opacus.optimizers import DPOptimizer
    assert isinstance(prepared.session.clients[0].optimizer, DPOptimizer)


# --- transition_audit -------------------------------------------------------------------------------


class _Shift:
    """A policy that shifts the hidden states it returns, on passes its party declares update-free."""

    def __init__(self, party):
        self.party, self.shifted = party, 0

    def on_forward(self, ids, step, hidden, mask, out):
        if self.party.updates:
            return out
        self.shifted += 1
        return out + 3.0

    def on_update(self, *args):
        pass

    def head_gradient(self, ids, step, hidden, mask, grad):
        return grad


class _DeclaresNoUpdates(TransitionAuditDefense):
    """The audited server sets its own ``updates`` flag to False on every pass and tampers with its outputs."""

    def install(self, session) -> None:
        super().install(session)
        party = session.server
        party.policy = self.policy = _Shift(party)
        recorded_forward, recorded_backward = party.forward, party.backward

        def forward(ids, step):
            self._was, party.updates = party.updates, False
            recorded_forward(ids, step)

        def backward(step=None, skip=None):
            try:
                recorded_backward(step, skip=skip)
            finally:
                party.updates = self._was

        party.forward, party.backward = forward, backward


def test_output_tampering_on_passes_the_party_declares_update_free_is_audited():
    audit = _DeclaresNoUpdates(_DeclaresNoUpdates.Config(rate=1.0))
    train_split(_cfg(), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert audit.policy.shifted > 0
    assert audit.flags  # today: 0 transitions recorded, 0 audited, 0 flagged at rate 1


class _ArrivesTampered(TransitionAuditDefense):
    """The server's adapters were 'trained toward its own goal' before the audit was installed."""

    def install(self, session) -> None:
        with torch.no_grad():
            for name, p in session.server.trunk.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        super().install(session)


def test_a_server_that_arrives_with_non_public_adapters_is_caught():
    audit = _ArrivesTampered(_ArrivesTampered.Config(rate=1.0, act=False))
    train_split(_cfg(), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert audit.flags  # today: the replica and the first committed state are copied from the live party


class _FrozenDrift(TransitionAuditDefense):
    """The server scales one frozen base weight between passes 2 and 3, then computes honestly."""

    def install(self, session) -> None:
        super().install(session)
        party, recorded, calls = session.server, session.server.forward, [0]

        def forward(ids, step):
            calls[0] += 1
            if calls[0] == 3:
                with torch.no_grad():
                    next(p for n, p in party.trunk.named_parameters()
                         if not p.requires_grad and "lora_" not in n and p.dim() == 2).mul_(1.5)
            recorded(ids, step)

        party.forward = forward


@pytest.mark.parametrize("rate", [1.0])
def test_a_frozen_weight_change_is_caught_once_and_the_standby_runs_clean(rate):
    audit = _FrozenDrift(_FrozenDrift.Config(rate=rate))
    train_split(_cfg(steps=4), SplitSpec(1, 1), tiny_model("llama"), defense=audit, reference=False)
    assert [f["transition"] for f in audit.flags] == [2]  # today: flagged at 2, 3, ..., 7 (the standby keeps it)
    assert audit.flags[0]["start_mismatch"]  # today: False (the commitment does not cover frozen weights)


# --- dp_sgd's sensitivity: the loss is a mean over the batch's tokens ---------------------------------


def test_one_record_moves_dp_sgds_clipped_sum_by_at_most_clip():
    """Opacus' accountant assumes adding one record moves the clipped sum by <= clip. causal_lm_loss divides
    by the batch's total target tokens, so one long record rescales every other record's per-example
    gradient: 15 copies of a 6-token record, plus one 74-token record, moved the sum by ~7 x clip. Under
    dp_sgd the client trains on each record's own loss (``client.loss``), measured here."""
    from suite.engine.parties import causal_lm_loss
    from suite.engine.split import position_ids_for
    from suite.experiment.prepared import prepare
    from suite.interfaces.defense import make_defense

    cfg = parse_config({"model": {"name": "tiny-llama"},
                        "data": {"max_length": 96, "held_out": 4,
                                 "private": {"generator": "records", "size": 32, "seed": 1},
                                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
                        "training": {"clients": 2, "steps": 0, "batch_size": 16}})
    prepared = prepare(cfg, SplitSpec(1, 1), loaded=tiny_model("llama"))
    defense = make_defense("dp_sgd", {"sigma": 0.0, "clip": 1.0, "target": "clients"})
    defense.install(prepared.session)
    client = prepared.session.clients[0]
    opt, data = client.optimizer, client.batches.data
    long_j = int(torch.argmax((data["labels"] != -100).sum(1)))
    rows = {}
    for k in ("input_ids", "attention_mask", "labels"):
        row = data[k][0].clone()
        row[6:] = {"attention_mask": 0, "labels": -100}.get(k, int(row[5]))
        rows[k] = torch.cat([row.expand(15, -1), data[k][long_j:long_j + 1]])

    def clipped_sum(n):
        opt.zero_grad(set_to_none=True)
        ids, mask, labels = (rows[k][:n] for k in ("input_ids", "attention_mask", "labels"))
        pos = position_ids_for(mask)
        head_out = client.head(ids, mask, pos)
        hidden = head_out.detach().requires_grad_(True)
        client.loss(client.tail(hidden, mask, pos), labels).backward()
        (head_out * hidden.grad).sum().backward()
        norms = torch.stack([p.grad_sample.reshape(n, -1).norm(dim=1) for p in opt.params], 1).norm(dim=1)
        opt.clip_and_accumulate()
        return torch.cat([p.summed_grad.reshape(-1).clone() for p in opt.params]), norms

    _, norms = clipped_sum(15)
    opt.max_grad_norm = clip = float(norms.median())
    without, _ = clipped_sum(15)
    with_j, _ = clipped_sum(16)
    assert client.loss is not causal_lm_loss  # the loss the client trains with under dp_sgd
    assert float((with_j - without).norm()) <= clip * 1.001
