"""The learned defenses (mid, bottleneck) and SanText: each changes what leaves the client, still trains,
keeps its learned parts on the client, leaves the server alone, and says how an attacker simulates it."""

import math

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec, position_ids_for
from suite.engine.training import FinetuneConfig, TrainConfig, build_session, eval_loss, train
from suite.interfaces.defense import make_defense, public_defense
from suite.net.checkpoint import trainable_state

SETTINGS = {
    "mid": {"lam": 0.01, "dim": 8, "seed": 1},
    "bottleneck": {"rank": 4, "seed": 1},
    "santext": {"epsilon": 60.0, "seed": 1},
}


def _shard(vocab: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(2, vocab, (3, 12), generator=g)
    ids = patterns[torch.randint(0, 3, (n,), generator=g)]
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _session(defense=None, steps=25):
    model = tiny_model("llama", num_layers=4).model
    vocab = model.config.vocab_size
    cfg = TrainConfig(strategy="serial", clients=2, steps=steps, batch_size=4, finetune=FinetuneConfig(lr=1e-2))
    session = build_session(model, SplitSpec(1, 1), [_shard(vocab, 12, i) for i in range(2)], cfg)
    if defense is not None:
        defense.install(session)
    return session


def _one_step(session, batch, step=0):
    client, server = session.clients[0], session.server
    client.send_activations(step, batch)
    server.forward([0], step)
    client.receive_hidden(step)
    server.backward(step)
    client.receive_gradient(step)
    return client.sent_activation


def _batch(session):
    from suite.engine.parties import Batch

    data = session.clients[0].batches.data
    return Batch(*(data[k][:4] for k in ("input_ids", "attention_mask", "labels")))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_changes_what_leaves_the_client(name):
    session = _session(make_defense(name, SETTINGS[name]))
    batch = _batch(session)
    head = session.clients[0].head
    with torch.no_grad():
        plain = head(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
    sent = _one_step(session, batch)
    real = batch.attention_mask.bool()
    gap = (sent - plain)[real].norm() / plain[real].norm()
    assert gap > 0.05, f"{name} sends nearly the undefended head output (relative gap {gap:.4f})"


def test_bottleneck_sends_a_rank_r_subspace():
    session = _session(make_defense("bottleneck", {"rank": 4, "seed": 1}))
    batch = _batch(session)
    sent = _one_step(session, batch)[batch.attention_mask.bool()]
    s = torch.linalg.svdvals(sent - sent.mean(0))
    assert s[4:].max() < 1e-4 * s[0], s  # every vector sent lies in one 4-dimensional affine subspace
    assert s[3] > 1e-3 * s[0]


def test_mid_samples_with_client_randomness_and_its_kl_acts():
    session = _session(make_defense("mid", {"lam": 0.01, "dim": 8, "seed": 1}))
    batch = _batch(session)
    first, second = _one_step(session, batch, 0), _one_step(session, batch, 1)
    assert not torch.allclose(first, second)  # a fresh sample every release
    # A larger KL weight pushes the bottleneck towards the prior: less information per token.
    kls = {}
    for lam in (0.0, 1.0):
        defense = make_defense("mid", {"lam": lam, "dim": 8, "seed": 1})
        train(_session(defense, steps=15))
        kls[lam] = defense.report()["kl_per_token_last10"]
    assert kls[1.0] < 0.6 * kls[0.0], kls  # about half after 15 steps (the lr bounds how far it moves)


def test_santext_replaces_tokens_and_trains_on_the_sanitised_text():
    defense = make_defense("santext", {"epsilon": 40.0, "seed": 1})
    session = _session(defense)
    client = session.clients[0]
    batch = _batch(session)
    client.send_activations(0, batch)
    used = client._batch  # what the client computes on this step
    real = batch.attention_mask.bool()
    assert (used.input_ids[real] != batch.input_ids[real]).any()
    assert torch.equal(used.input_ids[~real], batch.input_ids[~real])  # padding untouched
    assert torch.equal(used.labels, used.input_ids.masked_fill(batch.attention_mask == 0, -100))
    with torch.no_grad():
        expect = client.head(used.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
    assert torch.allclose(client.sent_activation, expect)  # the server sees the sanitised text's activations
    session.server.forward([0], 0)
    client.receive_hidden(0)
    session.server.backward(0)
    client.receive_gradient(0)
    client.send_activations(1, batch)  # the same record again: sanitised once, the same text
    assert torch.equal(client._batch.input_ids, used.input_ids)
    report = defense.report()
    assert 0 < report["replaced_fraction"] < 1
    assert math.isfinite(report["epsilon_per_record_bound"]) and report["epsilon_per_token_bound"] > 0


def test_santext_epsilon_sets_the_replacement_rate():
    from defenses.santext import sanitise

    table = torch.randn(50, 8)
    ids = torch.randint(0, 50, (40, 10))
    mask = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(0)
    high = (sanitise(ids, mask, table, 1e4, gen) != ids).float().mean()
    low = (sanitise(ids, mask, table, 1e-4, gen) != ids).float().mean()
    assert high == 0 and low > 0.9  # near-deterministic at large epsilon, near-uniform at tiny epsilon


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_trains_with_learned_parts_on_the_client_and_the_server_unchanged(name):
    defense = make_defense(name, SETTINGS[name])
    session = _session(defense)
    plain = _session()
    data = session.clients[0].batches.data
    before = eval_loss(session, data)
    learned = {k: v.clone() for k, v in trainable_state({"head": session.clients[0].head}).items()
               if "defense_" in k}
    logs = train(session)
    assert eval_loss(session, data) < before - 0.3, name  # held-out pass under the defense
    assert sum(logs[-1].losses) < sum(logs[0].losses)
    trunk_names = [n for n, _ in session.server.trunk.named_parameters()]
    assert trunk_names == [n for n, _ in plain.server.trunk.named_parameters()]  # server side unchanged
    if name != "santext":
        assert learned, "learned parts are not in the client's checkpointed state"
        after = trainable_state({"head": session.clients[0].head})
        assert any(not torch.equal(after[k], v) for k, v in learned.items())  # optimised with the client
        opt_params = {id(p) for g in session.clients[0].optimizer.param_groups for p in g["params"]}
        assert all(id(p) in opt_params for p in getattr(session.clients[0].head, f"defense_{name}").parameters())


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_attacker_simulation_uses_public_parameters_and_its_own_randomness(name):
    defense = make_defense(name, {k: v for k, v in SETTINGS[name].items() if k != "seed"})
    public = public_defense(defense)
    assert "seed" not in public.public_params()
    model = tiny_model("llama", num_layers=4).model
    from suite.engine.split import split_model

    head = split_model(model, SplitSpec(1, 1)).client_head.eval()
    shadow = _shard(model.config.vocab_size, 16, 5)
    ids, mask = shadow["input_ids"], shadow["attention_mask"]
    state = {k: v.clone() for k, v in head.state_dict().items()}
    sim = public.simulate_head(head, ids, mask, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in state.items())  # the given head is untouched
    a = public.simulate_release(sim, ids, mask, torch.Generator().manual_seed(1))
    b = public.simulate_release(sim, ids, mask, torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = head(ids, mask, position_ids_for(mask))
    assert a.shape == plain.shape
    assert not torch.allclose(a, plain, atol=1e-3)
    if name == "bottleneck":
        assert torch.allclose(a, b)  # deterministic mechanism
        s = torch.linalg.svdvals(a[mask.bool()] - a[mask.bool()].mean(0))
        assert s[4:].max() < 1e-4 * s[0]
    else:
        assert not torch.allclose(a, b)  # the randomness is the attacker's generator's
