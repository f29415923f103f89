"""dp_sgd's mechanism holds on every path of a step: each record's own loss (its gradient bounded by clip, see
also tests/test_redteam_dp_transition.py), a step a client rejects (no head backward), pipeline stages, and
no library warning on the command line."""

import math
import warnings

import pytest
import torch

from defenses.dp_sgd import DPSGDDefense, epsilon
from suite.engine.models import tiny_model
from suite.engine.parties import StepRejected, causal_lm_loss, per_record_lm_loss
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.interfaces.defense import make_defense


def _cfg(steps: int = 4, strategy: str = "serial", **training):
    return parse_config({"model": {"name": "tiny-llama"},
                         "data": {"max_length": 12, "held_out": 4,
                                  "private": {"generator": "records", "size": 16, "seed": 1},
                                  "shadow": {"generator": "records", "size": 8, "seed": 2}},
                         "training": {"clients": 2, "steps": steps, "batch_size": 4, "strategy": strategy,
                                      **training}})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def test_the_per_record_loss_is_each_rows_own_token_mean_and_the_plain_loss_is_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 3:] = -100  # a short row
    labels[2, 1:] = -100  # a row without targets adds 0
    rows = [torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100) for i in (0, 1)]
    assert float(per_record_lm_loss(logits, labels)) == pytest.approx(float(sum(rows)) / 3)
    # without dp_sgd: the batch's token mean, as HF computes it (the centralised reference depends on it)
    n = int((labels[:, 1:] != -100).sum())
    assert float(causal_lm_loss(logits, labels)) == pytest.approx(
        float(rows[0] * 2 + rows[1] * 5) / n)


class _RejectStep1(DPSGDDefense):
    """dp_sgd, and client 0 refuses the server's reply at step 1 (a detector's StepRejected)."""

    def install(self, session):
        super().install(session)

        def hook(step, hidden, batch):
            if step == 1:
                raise StepRejected("test: reject step 1")
            return hidden

        session.clients[0].hidden_hooks.append(hook)


@pytest.mark.parametrize("target", ["clients", "both"])
def test_a_rejected_step_does_not_break_the_next_one(base, target):
    """Red team: a rejected step left Opacus' per-example state on the head (no backward pass); the next step
    failed with 'Per sample gradient is not initialized', so a tampering server could crash the cell."""
    defense = _RejectStep1(_RejectStep1.Config(sigma=1.0, clip=1.0, target=target))
    trained = train_split(_cfg(steps=4), SplitSpec(1, 1), base, defense=defense, reference=False)
    clients = trained.prepared.session.clients
    assert clients[0].rejected_steps == [1]
    assert [c.optimizer_steps for c in clients] == [3, 4]
    losses = [x for step in trained.prepared.session.losses for x in step]
    assert sum(math.isnan(x) for x in losses) == 1 and all(math.isfinite(x) for x in losses if not math.isnan(x))


def test_a_dropped_server_pass_does_not_break_the_next_one(base):
    """A trunk pass whose gradients never come (a client died mid-step: discard_pending) leaves no stale
    per-example state on the server's trunk."""
    from suite.experiment.prepared import prepare

    prepared = prepare(_cfg(steps=0), SplitSpec(1, 1), loaded=base)
    defense = make_defense("dp_sgd", {"sigma": 1.0, "target": "server"})
    defense.install(prepared.session)
    from suite.engine.step import forward, training_step

    server, clients = prepared.session.server, prepared.session.clients
    forward(clients[:1], server, 0)  # client 0's gradient is never read: it went away
    server.discard_pending()
    before = [p.detach().clone() for p in server.trunk.parameters() if p.requires_grad]
    training_step(clients[1:], server, 1)
    after = [p.detach() for p in server.trunk.parameters() if p.requires_grad]
    assert server.optimizer_steps[None] == 1 and any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_dp_sgd_on_pipeline_stages_clips_and_noises_each_stage_and_accounts_for_them(base):
    from opacus.optimizers import DPOptimizer

    defense = make_defense("dp_sgd", {"sigma": 2.0, "clip": 1.0, "target": "server"})
    trained = train_split(_cfg(steps=2, stages=2), SplitSpec(1, 1), base, defense=defense, reference=False)
    stages = trained.prepared.session.server.stages
    assert len(stages) == 2 and all(isinstance(o, DPOptimizer) for s in stages for o in s.optimizers.values())
    assert all(steps == 2 * 2 for s in stages for steps in s.optimizer_steps.values())  # serial: one per client
    report = defense.report()
    assert report["clipped_parts"] == 2 and report["effective_sigma"] == pytest.approx(2.0 / math.sqrt(2))
    assert report["epsilon"] == pytest.approx(epsilon(2.0 / math.sqrt(2), 4 / 8, report["steps"], 1e-5))


def test_dp_sgd_on_the_clients_prints_no_library_warning_in_cli_processes(base):
    from suite.engine.quiet import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        train_split(_cfg(steps=1), SplitSpec(1, 1), base, reference=False,
                    defense=make_defense("dp_sgd", {"sigma": 1.0, "target": "both"}))
    assert not [str(w.message) for w in caught if "backward hook" in str(w.message)]


def test_a_networked_side_that_trains_no_lora_is_refused_in_one_line(base):
    from suite.errors import ConfigError
    from suite.experiment.prepared import prepare

    prepared = prepare(_cfg(steps=0), SplitSpec(1, 1), loaded=base)
    server, client = prepared.session.server, prepared.session.clients[0]
    for module in (server.trunk, client.head, client.tail):
        for p in module.parameters():
            p.requires_grad_(False)
    with pytest.raises(ConfigError, match="server_finetune = \"lora\""):
        make_defense("dp_sgd", {"target": "server"}).install_server(server)
    with pytest.raises(ConfigError, match="finetune = \"lora\""):
        make_defense("dp_sgd", {"target": "clients"}).install_client(client, None)
    make_defense("dp_sgd", {"target": "server"}).install_client(client, None)  # the client's part: its loss only
    assert client.loss is per_record_lm_loss


def test_a_networked_client_counts_every_pipeline_stage_behind_the_link_in_its_epsilon(base):
    """Over the network the client holds no stage; its ε must still count each stage's clipped part (the
    config's public stages), or it would report a smaller ε than the mechanism gives."""
    from suite.experiment.prepared import prepare
    from suite.interfaces.defense import RemoteServer

    reports = {}
    for stages in (1, 3):
        prepared = prepare(_cfg(steps=0), SplitSpec(1, 1), loaded=base)
        client = prepared.session.clients[0]
        defense = make_defense("dp_sgd", {"target": "both", "sigma": 1.0})
        defense.install_client(client, RemoteServer(prepared.session.server.trunk, lambda c, s: b"", {}, stages))
        client.optimizer_steps = 4
        reports[stages] = defense.report()
    assert reports[1]["clipped_parts"] == 2 and reports[3]["clipped_parts"] == 4
    assert reports[3]["effective_sigma"] == pytest.approx(1.0 / 2)
    assert reports[3]["epsilon"] > reports[1]["epsilon"]


@pytest.mark.parametrize("target, client_finetune, server_finetune, covered", [
    ("server", "lora", "lora", False),    # the clients' head and tail train without DP: no view's ε holds
    ("server", "frozen", "lora", True),   # nothing else trains: every view
    ("clients", "lora", "lora", False),   # the server's adapters train without DP
    ("clients", "lora", "frozen", True),
    ("both", "lora", "lora", True),
])
def test_epsilon_covers_a_view_only_when_every_part_that_trains_is_under_dp(base, target, client_finetune,
                                                                             server_finetune, covered):
    """A part trained without DP carries every record into every other record's gradient (reviewer): ε is
    claimed for a view only when every trained part is under DP-SGD."""
    cfg = _cfg(steps=1, finetune=client_finetune, server_finetune=server_finetune)
    defense = make_defense("dp_sgd", {"target": target})
    train_split(cfg, SplitSpec(1, 1), base, defense=defense, reference=False)
    report = defense.report()
    if covered:
        assert set(report["covers_views"]) == {"server_adapters", "colluder_model", "released_model"}
        assert "guarantee" not in report
    else:
        assert report["covers_views"] == [] and report["guarantee"].startswith("none")


def test_under_dp_sgd_no_batch_holds_a_record_twice_and_every_epoch_holds_each_once(base):
    """Red team: with N % B != 0 an epoch's remainder was topped up from the next epoch's permutation, so a
    record could be in a batch twice (clipped twice: 2 x clip). Under dp_sgd batches are distinct."""
    from suite.engine.parties import Batches
    from suite.experiment.prepared import prepare

    data = {k: torch.arange(10).unsqueeze(1) for k in ("input_ids", "attention_mask", "labels")}
    plain, distinct = Batches(data, 4, seed=0), Batches(data, 4, seed=0)
    distinct.distinct = True
    dup = 0
    seen = []
    for _ in range(200):
        ids = plain.next().input_ids.reshape(-1).tolist()
        dup += len(ids) != len(set(ids))
        ids = distinct.next().input_ids.reshape(-1).tolist()
        assert len(ids) == len(set(ids)), ids
        seen += ids
    assert dup > 0  # the plain sampler does repeat (what the red team found), so the test has power
    for epoch in range(len(seen) // 10):  # every epoch of the distinct sampler still holds each record once
        assert sorted(seen[10 * epoch: 10 * epoch + 10]) == list(range(10))
    prepared = prepare(_cfg(steps=0), SplitSpec(1, 1), loaded=base)
    client = prepared.session.clients[0]
    make_defense("dp_sgd", {"target": "both"}).install_client(client, None)
    assert client.batches.distinct
