"""Training equivalence: the split counts the same updates as its centralised reference, on every family.

* ``steps = 0`` is the untouched base model everywhere: the split's utility (after the traffic capture), the
  base model's and the reference's agree.
* With one client, one step and then N steps of split training (any depth, every strategy) hold the same
  LoRA values as the reference, a plain transformers + peft loop (max abs difference <= 1e-5 in fp32), and
  give the same held-out loss: same LoRA placement and initialisation, optimiser and data order.
* Every party's optimiser step count equals the budget; capturing the traffic adds none.
"""

import copy
import dataclasses
import re

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import parse_config
from suite.experiment.data import load_private, shard, tokenize
from suite.experiment.prepared import prepare
from suite.experiment.utility import _BLOCK, _token_loss, train_reference

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma3", "gpt2", "gpt_neox"]


def _cfg(family: str, steps: int, clients: int = 1, strategy: str = "serial", targets: str = "attention"):
    return parse_config({
        "model": {"name": f"tiny-{family}"},
        "data": {"max_length": 12, "held_out": 8, "private": {"generator": "records", "size": 6, "seed": 1},
                 "shadow": {"generator": "records", "size": 8, "seed": 2}},
        "training": {"clients": clients, "steps": steps, "batch_size": 2, "strategy": strategy, "lr": 1e-2,
                     "lora_targets": targets},
    })


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_model(request.param)


def _split_lora(session, client: int = 0) -> dict[str, torch.Tensor]:
    """The LoRA values one client's model holds, by place in the unsplit model ("<block>.<path>")."""
    server = session.server
    server.activate_for(client)
    adapter = server.adapters.get(client, "default") if server.adapters else "default"
    out = {}
    parts = [(session.clients[client].head, "default"), (server.trunk, adapter), (session.clients[client].tail, "default")]
    for part, adapter in parts:
        first = part.blocks.first
        for name, p in part.named_parameters():
            if ".lora_" not in name or f".{adapter}." not in name:
                continue
            index, inner = re.match(r"blocks\.layers\.(\d+)\.(.+)$", name).groups()
            out[f"{first + int(index)}.{inner.replace(f'.{adapter}.', '.default.')}"] = p.detach()
    return out


def _reference(cfg, base, steps: int):
    t = cfg.training
    records, held_out = load_private(cfg.data.private.spec(), cfg.data.held_out)
    shards = [tokenize(s, base.tokenizer, cfg.data.max_length) for s in shard(records, t.clients)]
    model, taken = train_reference(copy.deepcopy(base.model), shards, steps=steps, batch_size=t.batch_size, lr=t.lr,
                                   rank=t.lora_rank, alpha=t.lora_alpha, targets=t.lora_targets, seed=t.seed)
    lora = {"{}.{}".format(*_BLOCK.search(n).groups()): p.detach() for n, p in model.named_parameters()
            if "lora_" in n}
    return model, taken, lora, _token_loss(model, tokenize(held_out, base.tokenizer, cfg.data.max_length))


def test_zero_steps_is_the_untouched_base_model_everywhere(family):
    name, base = family
    cfg = _cfg(name, 0)
    trained = train_split(cfg, SplitSpec(1, 1), base)
    _, held_out = load_private(cfg.data.private.spec(), cfg.data.held_out)
    untouched = _token_loss(copy.deepcopy(base.model), tokenize(held_out, base.tokenizer, cfg.data.max_length))
    assert trained.utility == pytest.approx(untouched, abs=1e-5)
    assert trained.reference["utility_centralised"] == pytest.approx(untouched, abs=1e-5)
    assert trained.optimizer_steps == {"server": {"shared": 0}, "clients": [0], "reference": 0}


@pytest.mark.parametrize("strategy", ["serial", "batch_parallel", "per_client"])
def test_split_training_equals_the_reference_step_by_step(family, strategy):
    name, base = family
    for steps in (1, 3):
        cfg = _cfg(name, steps, strategy=strategy)
        trained = train_split(cfg, SplitSpec(1, 1), base, reference=False)
        split = _split_lora(trained.prepared.session)
        _, taken, ref, ref_loss = _reference(cfg, base, steps)
        assert set(split) == set(ref) and split, (sorted(split)[:3], sorted(ref)[:3])
        worst = max(float((split[k] - ref[k]).abs().max()) for k in ref)
        assert worst <= 1e-5, f"{name} {strategy} after {steps} steps: max |split - reference| = {worst:.2e}"
        moved = max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k)
        assert moved > 1e-3  # training moved the values the comparison covers
        assert trained.utility == pytest.approx(ref_loss, abs=1e-5)
        assert taken == steps


def test_lora_initialisation_does_not_depend_on_the_split(family):
    name, base = family
    cfg = _cfg(name, 0, targets="all")
    inits = []
    for spec in (SplitSpec(0, 0), SplitSpec(1, 1), SplitSpec(2, 1)):
        loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
        inits.append(_split_lora(prepare(cfg, spec, loaded=loaded).session))
    _, _, ref, _ = _reference(cfg, base, 0)
    for lora in inits:
        assert set(lora) == set(ref)
        assert all(torch.equal(lora[k], ref[k]) for k in ref)


@pytest.mark.parametrize(("strategy", "server"), [
    ("serial", {"shared": 6}), ("batch_parallel", {"shared": 3}), ("per_client", {"client0": 3, "client1": 3}),
])
def test_every_party_takes_exactly_its_budget_of_optimiser_steps(strategy, server):
    base = tiny_model("llama")
    trained = train_split(_cfg("llama", 3, clients=2, strategy=strategy), SplitSpec(1, 1), base)
    assert trained.optimizer_steps == {"server": server, "clients": [3, 3], "reference": 6}


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real(request):
    from suite.engine.models import load_model

    return request.param, load_model(request.param)


def _real_cfg(name: str, steps: int):
    return parse_config({
        "model": {"name": name},
        "data": {"max_length": 16, "held_out": 4, "private": {"generator": "records", "size": 4, "seed": 1},
                 "shadow": {"generator": "records", "size": 4, "seed": 2}},
        "training": {"clients": 1, "steps": steps, "batch_size": 2, "lr": 1e-3},
    })


@pytest.mark.slow
def test_real_models_count_the_same_updates_as_the_reference(real):
    """SmolLM2-135M and Gemma 3 270M: zero steps is the base model for split and reference; two steps of split
    training (k = 1, m = 1) hold the reference's LoRA values and give its held-out loss."""
    name, base = real
    zero = train_split(_real_cfg(name, 0), SplitSpec(1, 1), base)
    cfg = _real_cfg(name, 0)
    _, held_out = load_private(cfg.data.private.spec(), cfg.data.held_out)
    untouched = _token_loss(copy.deepcopy(base.model), tokenize(held_out, base.tokenizer, cfg.data.max_length))
    assert zero.utility == pytest.approx(untouched, abs=1e-4)
    assert zero.reference["utility_centralised"] == pytest.approx(untouched, abs=1e-4)
    cfg = _real_cfg(name, 2)
    trained = train_split(cfg, SplitSpec(1, 1), base, reference=False)
    split = _split_lora(trained.prepared.session)
    _, taken, ref, ref_loss = _reference(cfg, base, 2)
    assert set(split) == set(ref) and taken == 2
    worst = max(float((split[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= 1e-5, f"{name}: max |split - reference| = {worst:.2e}"
    assert trained.utility == pytest.approx(ref_loss, abs=1e-4)
