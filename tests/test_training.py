"""The strategies train, and batch-parallel and per-client do what FL-GLM's maths says."""

import copy

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.parties import Batch, trainable
from suite.engine.protocol import decode, encode
from suite.engine.split import SplitSpec
from suite.engine.training import FinetuneConfig, TrainConfig, build_session, eval_loss, train
from suite.engine.transport import Recorder
from suite.errors import ConfigError, ProtocolError


def _shard(vocab: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Learnable toy data: a few fixed sequences repeated, some right-padded."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, vocab, (3, 12), generator=g)
    ids = patterns[torch.randint(0, 3, (n,), generator=g)]
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _session(strategy: str, clients: int = 2, family: str = "llama", **ft):
    model = tiny_model(family, num_layers=4).model
    vocab = model.config.vocab_size
    cfg = TrainConfig(strategy=strategy, clients=clients, steps=25, batch_size=4,
                      finetune=FinetuneConfig(lr=ft.pop("lr", 1e-2), **ft))
    return build_session(model, SplitSpec(1, 1), [_shard(vocab, 12, i) for i in range(clients)], cfg)


@pytest.mark.parametrize("strategy", ["serial", "batch_parallel", "per_client"])
def test_every_strategy_reduces_loss(strategy):
    session = _session(strategy)
    data = _shard(session.split.config.vocab_size, 12, 0)
    before = eval_loss(session, data)
    logs = train(session)
    assert len(logs) == 25 and all(len(log.losses) == 2 for log in logs)
    assert eval_loss(session, data) < before - 0.5
    assert sum(logs[-1].losses) < sum(logs[0].losses)
    assert session.transport.pending() == 0


def test_batch_parallel_gradients_equal_summed_serial_gradients():
    """One trunk pass over M clients' rows gives the trunk the sum of the M per-client gradients, and each
    client the same gradient it would get alone (rows never interact inside the trunk)."""
    sess = _session("batch_parallel", clients=3, lr=1e-9)
    batches = [c.batches.next() for c in sess.clients]
    serial = copy.deepcopy(sess)  # same weights, same adapters, independent modules

    for c, b in zip(sess.clients, batches, strict=True):
        c.send_activations(0, b)
    sess.server.forward([0, 1, 2], 0)
    for c in sess.clients:
        c.receive_hidden(0)
    sess.server.backward(0)
    for c in sess.clients:
        c.receive_gradient(0)
    parallel_trunk = [p.grad.clone() for p in trainable([sess.server.trunk])]

    summed = [torch.zeros_like(g) for g in parallel_trunk]
    for c, b in zip(serial.clients, batches, strict=True):
        c.send_activations(0, b)
        serial.server.forward([c.id], 0)
        c.receive_hidden(0)
        serial.server.backward(0)
        c.receive_gradient(0)
        for acc, p in zip(summed, trainable([serial.server.trunk]), strict=True):
            acc += p.grad
    assert len(parallel_trunk) > 0
    for got, want in zip(parallel_trunk, summed, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    for a, b in zip(sess.clients, serial.clients, strict=True):
        for p, q in zip(trainable([a.head]), trainable([b.head]), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_batch_parallel_pads_clients_of_different_lengths():
    sess = _session("batch_parallel", clients=2)
    b0 = sess.clients[0].batches.next()
    b1 = sess.clients[1].batches.next()
    b1 = Batch(b1.input_ids[:, :7], b1.attention_mask[:, :7], b1.labels[:, :7])
    sess.clients[0].send_activations(0, b0)
    sess.clients[1].send_activations(0, b1)
    sess.server.forward([0, 1], 0)
    losses = [c.receive_hidden(0) for c in sess.clients]
    sess.server.backward(0)
    for c in sess.clients:
        c.receive_gradient(0)
    assert all(loss > 0 for loss in losses)


def test_per_client_keeps_one_adapter_set_per_client_on_one_base():
    sess = _session("per_client", clients=3)
    trunk = sess.server.trunk
    base = {n: p.detach().clone() for n, p in trunk.named_parameters() if "lora_" not in n}
    train(sess, steps=5)
    lora = {n: p for n, p in trunk.named_parameters() if "lora_" in n}
    names = {n.split(".")[-2] for n in lora}
    assert names == {"client0", "client1", "client2"}
    b = {n.replace("client0", "X"): p for n, p in lora.items() if "client0" in n and "lora_B" in n}
    c = {n.replace("client1", "X"): p for n, p in lora.items() if "client1" in n and "lora_B" in n}
    assert any(not torch.equal(b[n], c[n]) for n in b)  # trained separately
    for n, p in trunk.named_parameters():  # one frozen base, untouched
        if n in base:
            assert torch.equal(p, base[n])
    per_adapter = sum(p.numel() for n, p in lora.items() if "client0" in n)
    assert sum(p.numel() for p in lora.values()) == 3 * per_adapter


def test_fedavg_makes_client_weights_equal():
    model = tiny_model("gpt2", num_layers=4).model
    vocab = model.config.vocab_size
    cfg = TrainConfig(strategy="serial", clients=2, steps=4, fedavg_every=2, finetune=FinetuneConfig(lr=1e-2))
    sess = build_session(model, SplitSpec(1, 1), [_shard(vocab, 8, 0), _shard(vocab, 8, 1)], cfg)
    train(sess)
    a, b = (trainable([c.head, c.tail]) for c in sess.clients)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_full_client_finetuning_trains_the_head():
    sess = _session("serial", client="full", lr=1e-3)
    head = sess.clients[0].head
    assert all(p.requires_grad for p in head.parameters())
    before = head.embed.weight.detach().clone()
    train(sess, steps=2)
    assert not torch.equal(before, head.embed.weight)


def test_every_message_of_a_run_round_trips_bit_exactly():
    sess = _session("batch_parallel")
    rec = Recorder()
    sess.transport.add_tap(rec)
    train(sess, steps=2)
    assert len(rec.frames) == 2 * 2 * 4  # steps x clients x four messages
    for frame in rec.frames:
        assert encode(decode(frame.data)) == frame.data


def test_bad_training_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown strategy 'zigzag'"):
        TrainConfig(strategy="zigzag")
    with pytest.raises(ConfigError):
        FinetuneConfig(client="half")


def test_server_rejects_a_message_for_the_wrong_step():
    sess = _session("serial", clients=1)
    sess.clients[0].send_activations(0)
    with pytest.raises(ProtocolError, match="step 1"):
        sess.server.forward([0], 1)


def test_full_lr_is_the_rate_of_the_parts_trained_in_full_only():
    """``full_lr``: a client trained in full steps at it, the server's LoRA at ``lr``; unset, both at ``lr``.
    A cell with nothing trained in full keeps its key whatever the rate; one trained in full gets another."""
    from suite.experiment.config import parse_config
    from suite.experiment.plan import cell_key, expand

    session = _session("serial", client="full", server="lora", lr=1e-3, full_lr=5e-5)
    assert [g["lr"] for g in session.clients[0].optimizer.param_groups] == [5e-5]
    assert {g["lr"] for o in session.server.optimizers.values() for g in o.param_groups} == {1e-3}
    session = _session("serial", client="lora", server="full", lr=1e-3, full_lr=5e-5)
    assert [g["lr"] for g in session.clients[0].optimizer.param_groups] == [1e-3]
    assert {g["lr"] for o in session.server.optimizers.values() for g in o.param_groups} == {5e-5}
    assert FinetuneConfig(client="full", lr=1e-3).lr_of("full") == 1e-3
    with pytest.raises(ConfigError, match="full_lr"):
        FinetuneConfig(full_lr=0.0)

    def key(**training):
        cfg = parse_config({"model": {"name": "tiny-llama"}, "training": {"steps": 1, **training},
                            "matrix": {"splits": [1], "threats": ["curious_server"],
                                                       "attacks": ["nearest_embedding"], "blind": False}})
        cells, _ = expand(cfg)
        return [cell_key(c, cfg, "rev") for c in cells]

    assert key() == key(full_lr=5e-5)  # nothing trained in full: the rate changes nothing
    assert key(finetune="full", full_lr=5e-5) != key(finetune="full")


def test_a_full_lr_that_trains_nothing_leaves_the_networked_config_hash_as_it_was():
    """Client, server and stages agree on ``config_hash``, and a checkpoint resumes only under the same one:
    a rate that trains nothing must not change it (checkpoints written before ``full_lr`` existed resume)."""
    from suite.experiment.config import parse_config
    from suite.net.parties import config_hash

    def digest(**training):
        return config_hash(parse_config({"model": {"name": "tiny-llama"}, "training": training}))

    assert digest() == digest(full_lr=5e-5) == "406852ec13b0aa11"  # the default's hash before full_lr existed
    assert digest(finetune="full", full_lr=5e-5) != digest(finetune="full")
