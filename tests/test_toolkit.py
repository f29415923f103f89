"""The attack toolkit's public pieces (``attacks.toolkit``): each does what its name says, on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attacks.bisr import BiSRConfig
from attacks.prefix_inversion import PrefixInversionConfig
from attacks.toolkit.decoding import cosine_topk, nearest_rows
from attacks.toolkit.linear import LinearInverter, design, standardiser
from attacks.toolkit.observe import public_parts, reference_parts, run_head, shadow_batch, tokenize
from attacks.toolkit.prefix.options import PrefixOptions
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec, split_model
from suite.experiment.data import Record
from suite.experiment.data import tokenize as clients_tokenize
from suite.interfaces.threats import Observations, get_threat
from suite.scoring.metrics import token_accuracy

TEXTS = ("Alice Smith lives at 12 Oak Road.", "", "a much longer line of text that the tokenizer must truncate " * 3)


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", num_layers=3)


def _obs(loaded, colluder: bool = False, shadow=TEXTS) -> Observations:
    def colluder_head_tail():
        parts = split_model(copy.deepcopy(loaded.model), SplitSpec(1, 1))
        with torch.no_grad():  # a "fine-tuned" head and tail: other weights than the public ones
            for p in [*parts.client_head.parameters(), *parts.client_tail.parameters()]:
                p.add_(0.01)
        return parts.client_head.train(), parts.client_tail.train()

    return Observations(threat=get_threat("colluding_client" if colluder else "curious_server"),
                        spec=SplitSpec(1, 1), tokenizer=loaded.tokenizer, max_length=12,
                        base_model=lambda: copy.deepcopy(loaded.model), shadow=shadow,
                        colluder_head_tail=colluder_head_tail if colluder else None)


def test_tokenize_is_the_clients_tokenisation(loaded):
    """What the training data loader feeds the clients (right padding to max_length, truncated), so position t
    of the attacker's shadow pairs means what it means in the victims' traffic."""
    ids, mask = tokenize(loaded.tokenizer, TEXTS, 12)
    want = clients_tokenize([Record(t) for t in TEXTS], loaded.tokenizer, 12)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert ids.shape == (3, 12) and mask[1].sum() == 0 and mask[2].all()  # empty text; truncated text
    sh_ids, sh_mask = shadow_batch(_obs(loaded))
    assert torch.equal(sh_ids, ids) and torch.equal(sh_mask, mask)
    assert shadow_batch(_obs(loaded, shadow=None)) is None
    short, short_mask = tokenize(loaded.tokenizer, TEXTS[:1], 12, longest=True)  # likelihoods: pad to the longest
    assert short_mask.all() and torch.equal(short, ids[:1, : short.shape[1]])


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


def test_reference_parts_are_the_colluders_where_granted_and_always_frozen(loaded):
    public = public_parts(_obs(loaded))
    assert public.source == "base" and all(_frozen(m) for m in (public.head, public.trunk, public.tail, public.model))
    granted = _obs(loaded, colluder=True)
    ref = reference_parts(granted)
    assert ref.source == "colluder" and all(_frozen(m) for m in (ref.head, ref.trunk, ref.tail))
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    assert not torch.allclose(run_head(ref.head, ids, mask), run_head(public.head, ids, mask))  # the colluder's
    torch.testing.assert_close(run_head(ref.trunk, run_head(ref.head, ids, mask), mask),  # the trunk: public
                               run_head(public.trunk, run_head(ref.head, ids, mask), mask))
    assert reference_parts(granted, use_colluder=False).source == "base"


def test_cosine_topk_and_nearest_rows_rank_rows_by_cosine():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 6, generator=gen)
    vectors = torch.randn(3, 7, 6, generator=gen)
    brute = F.normalize(vectors, dim=-1) @ F.normalize(table, dim=-1).T
    vals, idx = cosine_topk(vectors, table, 5, chunk=4)
    want_vals, want_idx = brute.topk(5, dim=-1)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(vals, want_vals)
    assert torch.equal(cosine_topk(vectors, table, 5, chunk=None)[1], idx)
    assert torch.equal(nearest_rows(vectors, table, chunk=5), brute.argmax(-1))
    assert torch.equal(nearest_rows(table[[4, 9]] * 3.0, table), torch.tensor([4, 9]))  # scale does not matter


def test_design_is_standardised_outputs_one_hot_position_and_a_constant():
    x = torch.randn(2, 3, 4)
    out = design(x, 5)
    assert out.shape == (2, 3, 4 + 5 + 1)
    assert torch.equal(out[..., :4], x) and torch.equal(out[..., -1], torch.ones(2, 3))
    assert torch.equal(out[0, :, 4:9], torch.eye(5)[:3])
    assert design(x, 5, position=False).shape == (2, 3, 5)
    mu, sd = standardiser(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
    assert torch.equal(mu, torch.tensor([1.0, 1.0])) and sd[1] > 0  # a constant dimension gets a floor, not 0


def test_linear_inverter_reads_tokens_from_a_tiny_heads_outputs(loaded):
    """Fitted on (head output, token) pairs of random token sequences through the public head at k = 1, it
    reads the tokens of other sequences far beyond chance."""
    head = public_parts(_obs(loaded)).head
    vocab = head.embed.num_embeddings
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (256, 8), generator=gen)
    mask = torch.ones_like(ids)
    feats = run_head(head, ids, mask)
    table = head.embed.weight.detach()
    inverter = LinearInverter(feats[:224], ids[:224], mask[:224], table, k=4, lam=1e-3)
    got = nearest_rows(inverter.predict(feats[224:]), table)
    accuracy = token_accuracy(ids[224:], got, mask[224:])
    assert accuracy > 50 / vocab and accuracy > 0.1, accuracy  # chance is 1 / vocab
    top = inverter(feats[224:])
    assert top.shape == (32, 8, 4) and torch.equal(top[..., 0], got)  # its top-k's first is the nearest row


def test_each_attack_config_builds_the_prefix_options_it_sets():
    """One options object feeds the search: every field the attack's config has lands in it unchanged (the
    runner-up count is the config's ``tie_alternatives``), the others keep the bare search's defaults."""
    for config in (PrefixInversionConfig(beam=2, widen_below=0.96, seed=3), BiSRConfig(prior=7, rho=0.5, seed=4)):
        options = config.options()
        fields = {f.name for f in dataclasses.fields(config)}
        for f in dataclasses.fields(PrefixOptions):
            name = "tie_alternatives" if f.name == "alternatives" else f.name
            want = getattr(config, name) if name in fields else f.default
            assert getattr(options, f.name) == want, (type(config).__name__, f.name)


def test_the_toolkit_imports_no_concrete_attack():
    spec = importlib.util.spec_from_file_location("layers", Path(__file__).with_name("test_layers.py"))
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)
    graph = layers.import_graph()
    toolkit = {m: t for m, t in graph.items() if m.startswith("attacks.toolkit")}
    assert toolkit, "no toolkit modules found"
    wrong = {m: sorted(t for t in targets if t.startswith("attacks.") and not t.startswith("attacks.toolkit"))
             for m, targets in toolkit.items()}
    assert not any(wrong.values()), wrong
