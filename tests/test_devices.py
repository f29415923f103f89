"""Devices and dtypes: bf16 on the CPU end to end, where each party's parameters live, refusal of an absent
device with one line, and the device abstraction the GPU paths go through (exercised here on the CPU)."""

import copy

import pytest
import torch

from suite.cli import main
from suite.engine.device import resolve_device, resolve_dtype
from suite.engine.models import tiny_model
from suite.engine.parties import Batch, causal_lm_loss
from suite.engine.protocol import ActivationMsg, decode, encode
from suite.engine.split import SplitSpec, split_model
from suite.engine.training import FinetuneConfig, TrainConfig, build_session, eval_loss, train
from suite.errors import ConfigError
from suite.experiment.config import parse_config
from suite.experiment.prepared import devices, prepare
from suite.interfaces.threats import ObservedBatch


def _shard(vocab: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, vocab, (3, 12), generator=g)
    ids = patterns[torch.randint(0, 3, (n,), generator=g)]
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _parts(session):
    yield "server.trunk", session.server.trunk
    for c in session.clients:
        yield f"client{c.id}.head", c.head
        yield f"client{c.id}.tail", c.tail


@pytest.mark.parametrize("strategy", ["batch_parallel", "per_client"])
def test_bf16_trains_on_the_cpu_and_every_part_is_bf16_on_its_device(strategy):
    model = tiny_model("llama", num_layers=4).model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    cfg = TrainConfig(strategy=strategy, clients=2, steps=20, batch_size=4, finetune=FinetuneConfig(lr=1e-2))
    session = build_session(model, SplitSpec(1, 1), [_shard(vocab, 12, i) for i in range(2)], cfg,
                            client_device="cpu", server_device=torch.device("cpu"))
    for name, part in _parts(session):
        for pname, p in part.named_parameters():
            assert p.device.type == "cpu", f"{name}.{pname} on {p.device}"
            if "lora_" not in pname:  # base weights keep the run's dtype (peft may keep adapters in fp32)
                assert p.dtype == torch.bfloat16, f"{name}.{pname} is {p.dtype}"
    assert session.server.device == torch.device("cpu") and all(c.device.type == "cpu" for c in session.clients)
    data = _shard(vocab, 12, 0)
    before = eval_loss(session, data)
    logs = train(session)
    assert all(torch.isfinite(torch.tensor(log.losses)).all() for log in logs)
    assert eval_loss(session, data) < before - 0.3
    assert session.transport.pending() == 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_split_equals_unsplit_in_bf16(family):
    model = tiny_model(family, num_layers=4).model.to(torch.bfloat16)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = split_model(model, SplitSpec(2, 1)).forward(ids, mask)
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    # The same kernels in the same order: equal up to bf16 rounding (in practice bit for bit).
    torch.testing.assert_close(got[real].float(), expected[real].float(), rtol=2e-2, atol=2e-2)
    fp32 = tiny_model(family, num_layers=4).model
    with torch.no_grad():
        full = fp32(input_ids=ids, attention_mask=mask).logits
    assert (got[real].float() - full[real]).abs().max() < 0.5  # bf16 is close to fp32, not equal


def test_bf16_wire_round_trip_keeps_dtype_and_lands_on_the_receivers_device():
    hidden = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    msg = ActivationMsg(0, 3, "to_server", hidden, torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, 5))
    out = decode(encode(msg), device=torch.device("cpu"))
    assert out.hidden.dtype == torch.bfloat16 and torch.equal(out.hidden, hidden)
    assert out.hidden.device.type == "cpu"


def test_attacks_see_float32_host_tensors_whatever_the_party_dtype():
    obs = ObservedBatch(0, 0, torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.long),
                        torch.randn(2, 3, 4, dtype=torch.float16))
    assert obs.hidden.dtype == torch.float32 and obs.gradient.dtype == torch.float32
    same = torch.randn(2, 3, 4)
    assert ObservedBatch(0, 0, same, torch.ones(2, 3)).hidden is same  # fp32 on the host: untouched


def test_config_device_dtype_and_prepare_places_the_parties():
    cfg = parse_config({"model": {"name": "tiny-gemma3", "device": "cpu", "server_device": "cpu",
                                  "dtype": "bfloat16"},
                        "data": {"max_length": 16, "private": {"generator": "records", "size": 8, "seed": 1}},
                        "training": {"steps": 1, "clients": 2, "batch_size": 2}})
    assert devices(cfg) == (torch.device("cpu"), torch.device("cpu"))
    from suite.experiment.prepared import load_for

    prepared = prepare(cfg, SplitSpec(1, 1), loaded=load_for(cfg))
    session = prepared.session
    for name, part in _parts(session):
        floats = [p for n, p in part.named_parameters() if "lora_" not in n]
        assert floats and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in floats), name
    logs = train(session, steps=1)
    assert all(torch.isfinite(torch.tensor(log.losses)).all() for log in logs)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_bad_device_names_are_config_errors(bad):
    with pytest.raises(ConfigError, match="model.device"):
        parse_config({"model": {"device": bad}})
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device(bad)


def test_auto_is_the_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        resolve_dtype("int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_absent_device_is_refused_in_one_line(name, capsys):
    with pytest.raises(ConfigError, match=f"device '{name}' is not available on this machine.*--device cpu"):
        resolve_device(name)
    rc = main(["train", "--model", "tiny-llama", "--steps", "1", "--device", name])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert f"device '{name}' is not available on this machine" in err and "Traceback" not in err
    rc = main(["run", "--out", "/nonexistent/never-written", "--device", name])
    assert rc == 2 and "is not available" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_server_device_is_refused_even_when_the_clients_device_exists(capsys):
    rc = main(["train", "--model", "tiny-llama", "--steps", "1", "--device", "cpu", "--server-device", "cuda:0"])
    assert rc == 2 and "device 'cuda:0' is not available" in capsys.readouterr().err


def test_cli_trains_in_bf16_on_the_cpu(capsys):
    rc = main(["train", "--model", "tiny-llama", "--steps", "2", "--private-size", "8", "--max-length", "16",
               "--device", "cpu", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out loss" in out


def test_loss_is_computed_in_fp32_from_bf16_logits():
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    loss = causal_lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    assert Batch(labels, labels, labels).to(torch.device("cpu")).input_ids is labels


@pytest.mark.parametrize("client", ["lora", "full"])
def test_clients_share_frozen_base_weights_only(client):
    """Memory: under LoRA the clients' copies share the frozen base weights (one copy of the embedding, not
    one per client) and never write them; a client that trains its whole head gets its own weights."""
    model = tiny_model("llama", num_layers=4).model
    vocab = model.config.vocab_size
    cfg = TrainConfig(clients=2, steps=2, batch_size=4, finetune=FinetuneConfig(client=client, lr=1e-2))
    session = build_session(model, SplitSpec(1, 1), [_shard(vocab, 8, i) for i in range(2)], cfg)
    heads = [c.head for c in session.clients]
    before = heads[0].embed.weight.detach().clone()
    shared = heads[0].embed.weight is heads[1].embed.weight
    assert shared == (client == "lora")
    own = [{id(p) for p in h.parameters() if p.requires_grad} for h in heads]
    assert own[0] and not own[0] & own[1]  # what a client trains is its own
    train(session)
    if client == "lora":
        assert torch.equal(heads[0].embed.weight, before) and heads[0].embed.weight is model.model.embed_tokens.weight
    else:
        assert not torch.equal(heads[0].embed.weight, before)
        assert not torch.equal(heads[0].embed.weight, heads[1].embed.weight)
