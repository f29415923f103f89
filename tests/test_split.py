"""The split model is the unsplit model: same logits, same gradient for every parameter, every family."""

import copy

import pytest
import torch

from suite.engine.models import TINY_FAMILIES, tiny_model
from suite.engine.parties import Batch, Batches, Client, Server, causal_lm_loss
from suite.engine.split import SplitSpec, _check_partition, split_model
from suite.engine.transport import InProcessTransport
from suite.errors import ModelError


def _batch(vocab: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding of different lengths
    mask[2, 4:] = 0
    return Batch(ids, mask, ids.masked_fill(mask == 0, -100))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_split_equals_unsplit_logits_and_gradients(family, k):
    model = tiny_model(family, num_layers=4).model
    model.requires_grad_(True)
    ref = copy.deepcopy(model)
    batch = _batch(model.config.vocab_size)

    ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    causal_lm_loss(ref_logits, batch.labels).backward()

    split = split_model(model, SplitSpec(head_blocks=k, tail_blocks=1))
    real = batch.attention_mask.bool()
    with torch.no_grad():
        logits = split.forward(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(logits[real], ref_logits.detach()[real], rtol=1e-5, atol=1e-6)

    # The same step through the parties and the byte-level wire.
    transport = InProcessTransport()
    data = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    client = Client(0, split.client_head, split.client_tail, Batches(data, 3, 0), transport, lr=1e-3)
    server = Server(split.server_trunk, transport, lr=1e-3)
    client.send_activations(0, batch)
    server.forward([0], 0)
    client.receive_hidden(0)
    server.backward(0)
    client.receive_gradient(0)
    assert transport.pending() == 0

    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient through the split"
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(ref_params)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_parameter_in_exactly_one_part(family):
    model = tiny_model(family, num_layers=4).model
    split = split_model(model, SplitSpec(1, 1))
    head = {id(p) for p in split.client_head.parameters()}
    trunk = {id(p) for p in split.server_trunk.parameters()}
    tail = {id(p) for p in split.client_tail.parameters()}
    assert not trunk & (head | tail)
    assert head | trunk | tail == {id(p) for p in model.parameters()}
    tied = head & tail
    assert bool(tied) == bool(model.config.tie_word_embeddings)
    assert len(split.server_trunk.blocks.layers) == 2


def test_partition_check_is_loud():
    model = tiny_model("llama", num_layers=4).model
    split = split_model(model, SplitSpec(1, 1))
    with pytest.raises(ModelError, match="also in"):
        _check_partition(model, split.client_head, split.client_head, split.client_tail)
    lonely = torch.nn.Linear(2, 2)
    split.server_trunk.blocks.layers.append(lonely)
    with pytest.raises(ModelError, match="does not"):
        _check_partition(model, split.client_head, split.server_trunk, split.client_tail)


@pytest.mark.parametrize(("k", "m"), [(-1, 1), (1, -1), (3, 2), (5, 0)])
def test_invalid_split_is_one_line_error(k, m):
    model = tiny_model("llama", num_layers=4).model
    with pytest.raises(ModelError) as err:
        split_model(model, SplitSpec(k, m))
    assert "\n" not in str(err.value) and "split" in str(err.value)


def test_whole_model_on_clients_leaves_an_empty_trunk():
    model = tiny_model("gpt2", num_layers=4).model
    split = split_model(model, SplitSpec(2, 2))
    assert len(split.server_trunk.blocks.layers) == 0
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out = split.forward(batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real])


def test_unsupported_family_is_one_line_error():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                    word_embed_proj_dim=16, max_position_embeddings=32)
    with pytest.raises(ModelError, match="supported families"):
        split_model(OPTForCausalLM(cfg), SplitSpec(1, 1))
