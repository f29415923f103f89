"""Pipeline stages (``[training] stages = S``): the trunk split into S stage parties computes exactly what the
unsplit model does, over the wire.

* Logits, the loss and every parameter's gradient of one protocol step (full fine-tuning of every party)
  equal the unsplit transformers model's, for S = 2 and 4 on two families.
* Every strategy, under LoRA and with frozen stages, trains the same values with S = 2 / 4 as with S = 1.
* Messages between stages cross the transport as bytes; the client sees one server.
"""

import copy

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.parties import causal_lm_loss
from suite.engine.protocol import decode
from suite.engine.split import SplitSpec
from suite.engine.stages import StageChain, split_trunk, stage_sizes
from suite.engine.step import local_forward, training_step
from suite.engine.training import FinetuneConfig, TrainConfig, build_session, train
from suite.engine.transport import Recorder
from suite.errors import ConfigError

FAMILIES = ["llama", "gpt2"]
LAYERS = 6  # with one head and one tail block the trunk has 4: S = 4 gives one block a stage


def _shards(clients: int, rows: int = 4, length: int = 10, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(clients):
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[1, 7:] = 0  # one padded row: padding must not change anything either
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _session(base, stages: int, strategy: str = "serial", clients: int = 1, client: str = "full",
             server: str = "full", steps: int = 1):
    model = copy.deepcopy(base.model)
    cfg = TrainConfig(strategy=strategy, clients=clients, steps=steps, batch_size=2, stages=stages,
                      finetune=FinetuneConfig(client=client, server=server, lr=1e-2))
    return model, build_session(model, SplitSpec(1, 1), _shards(clients), cfg)


def _record_grads(session) -> dict[int, torch.Tensor]:
    """Wrap every optimiser's ``step`` to keep the gradients it is about to apply (by parameter id)."""
    grads: dict[int, torch.Tensor] = {}
    servers = session.server.stages if isinstance(session.server, StageChain) else [session.server]
    optimizers = [c.optimizer for c in session.clients] + [o for s in servers for o in s.optimizers.values()]
    for opt in optimizers:
        inner = opt.step

        def step(*args, _inner=inner, _opt=opt, **kwargs):
            for group in _opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[id(p)] = p.grad.detach().clone()
            return _inner(*args, **kwargs)

        opt.step = step
    return grads


def _names(model, session) -> dict[int, str]:
    """Parameter id in the session -> name in the unsplit model (the client's head and tail are copies)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {id(p): by_id[id(p)] for p in session.split.server_trunk.parameters()}
    client = session.clients[0]
    for mine, original in ((client.head, session.split.client_head), (client.tail, session.split.client_tail)):
        for p, q in zip(mine.parameters(), original.parameters(), strict=True):
            out[id(p)] = by_id[id(q)]
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_model(request.param, num_layers=LAYERS)


@pytest.mark.parametrize("stages", [2, 4])
def test_logits_loss_and_every_gradient_equal_the_unsplit_model(family, stages):
    name, base = family
    reference = copy.deepcopy(base.model).requires_grad_(True)
    model, session = _session(base, stages)
    assert isinstance(session.server, StageChain) and len(session.server.stages) == stages
    grads = _record_grads(session)
    recorder = Recorder()
    session.transport.add_tap(recorder)
    batch = session.clients[0].batches.next()

    with torch.no_grad():  # logits of the deployed chain, computed locally
        chain_logits = local_forward(session.clients[0], session.server, batch)
    (loss,) = training_step(session.clients, session.server, 0, [batch])

    ref_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref_loss = causal_lm_loss(ref_logits, batch.labels)
    ref_loss.backward()
    real = batch.attention_mask.bool()
    assert torch.allclose(chain_logits[real], ref_logits.detach()[real], atol=1e-5), name
    assert loss == pytest.approx(float(ref_loss.detach()), abs=1e-5)

    names = _names(model, session)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    got = {names[i]: g for i, g in grads.items()}
    assert set(got) == {n for n, g in ref_grads.items() if g is not None}, set(ref_grads) ^ set(got)
    worst = max(float((got[n] - ref_grads[n]).abs().max()) for n in got)
    assert worst <= 1e-5, f"{name} S={stages}: max |gradient - unsplit| = {worst:.2e}"

    # The stages talk to each other in bytes, over the transport; the client talks to "server" only.
    links = {(f.src, f.dst) for f in recorder.frames}
    for i in range(stages - 1):
        assert (f"stage/{i}", f"stage/{i + 1}") in links and (f"stage/{i + 1}", f"stage/{i}") in links
    assert {f.src for f in recorder.frames if f.dst == "client/0"} == {"server"}
    for f in recorder.frames:
        decode(f.data)  # every frame is a well-formed message


@pytest.mark.parametrize("strategy", ["serial", "batch_parallel", "per_client"])
@pytest.mark.parametrize("server", ["lora", "frozen"])
def test_every_strategy_trains_the_same_values_with_stages(strategy, server):
    base = tiny_model("llama", num_layers=LAYERS)
    runs = []
    for stages in (1, 2, 4):
        _, session = _session(base, stages, strategy=strategy, clients=2, client="lora", server=server, steps=3)
        logs = train(session)
        session.server.activate_for(1)
        lora = {}
        trunks = session.server.trunk.parts if stages > 1 else [session.server.trunk]
        parts = [session.clients[1].head, *trunks, session.clients[1].tail]
        for part in parts:
            first = part.blocks.first
            for n, p in part.named_parameters():
                if "lora_" in n and ((".client1." in n) or (".default." in n)):
                    index, inner = n.removeprefix("blocks.layers.").split(".", 1)
                    lora[f"{first + int(index)}.{inner.replace('.client1.', '.default.')}"] = p.detach()
        runs.append(([log.losses for log in logs], lora))
    (losses1, lora1), *others = runs
    assert lora1 and any(float(v.abs().max()) > 1e-3 for k, v in lora1.items() if "lora_B" in k)
    for losses, lora in others:
        assert set(lora) == set(lora1)
        assert max(float((lora[k] - lora1[k]).abs().max()) for k in lora1) <= 1e-5
        assert torch.allclose(torch.tensor(losses), torch.tensor(losses1), atol=1e-5)


def test_optimiser_steps_are_counted_per_stage():
    base = tiny_model("llama", num_layers=LAYERS)
    _, session = _session(base, 2, strategy="batch_parallel", clients=2, client="lora", server="lora", steps=2)
    train(session)
    assert session.server.optimizer_steps == {"stage0": 2, "stage1": 2}


def test_stage_sizes_and_bad_stage_counts():
    assert stage_sizes(5, 2) == [3, 2] and stage_sizes(4, 4) == [1, 1, 1, 1]
    base = tiny_model("llama", num_layers=LAYERS)
    with pytest.raises(ConfigError, match="stages = 5 needs at least 5 server blocks"):
        _session(base, 5)
    with pytest.raises(ConfigError, match="stages >= 1"):
        TrainConfig(stages=0)
    trunk = copy.deepcopy(base.model)
    from suite.engine.split import split_model

    parts = split_trunk(split_model(trunk, SplitSpec(1, 1)).server_trunk, 3)
    assert [p.blocks.first for p in parts] == [1, 3, 4]


def test_a_whole_server_policy_or_audit_is_refused_with_stages():
    base = tiny_model("llama", num_layers=LAYERS)
    _, session = _session(base, 2)
    with pytest.raises(ConfigError, match="malicious_stage"):
        session.server.policy = object()
    with pytest.raises(ConfigError, match="use transition_audit"):
        session.server.commit_state = True


def test_a_poisoning_client_refused_by_the_last_stage_is_refused_by_every_stage():
    """The last stage refuses client 1's update (its gradient would make values non-finite): no stage applies
    it, client 1 gets no reply, the honest client is answered and every stage took its update."""
    from suite.engine.parties import UpdateRefused
    from suite.engine.protocol import TO_SERVER, GradientMsg, encode
    from suite.engine.transport import SERVER

    base = tiny_model("llama", num_layers=LAYERS)
    _, session = _session(base, 2, strategy="batch_parallel", clients=2, client="lora", server="lora")
    chain, (honest, poisoner) = session.server, session.clients
    before = [{n: p.detach().clone() for n, p in s.trunk.named_parameters() if p.requires_grad}
              for s in chain.stages]
    honest.send_activations(0)
    poisoner.send_activations(0)
    chain.forward([0, 1], 0)
    honest.receive_hidden(0)
    shape = decode(session.transport.recv(poisoner.endpoint, SERVER)).hidden.shape
    session.transport.send(poisoner.endpoint, SERVER, encode(GradientMsg(1, 0, TO_SERVER, torch.full(shape, 3e38))))
    with pytest.raises(UpdateRefused, match="client 1: stage 1: its gradient would have made") as err:
        chain.backward()
    assert set(err.value.clients) == {1}
    honest.receive_gradient(0)
    assert session.transport.pending() == 0  # no reply for the poisoner, nothing left between the stages
    for stage, was in zip(chain.stages, before, strict=True):
        assert any(not torch.equal(p, was[n]) for n, p in stage.trunk.named_parameters() if p.requires_grad)
        assert all(bool(torch.isfinite(p).all()) for p in stage.trunk.parameters())


def test_integrity_audit_refuses_stages_with_the_reason():
    """Its verifier is a client, which sees only the pipeline's ends: a one-line refusal pointing at
    transition_audit, in one process and for a networked stage alike."""
    from defenses.integrity_audit import IntegrityAuditDefense
    from suite.net.stages import StageNode

    _, session = _session(tiny_model("llama", num_layers=LAYERS), 2)
    with pytest.raises(ConfigError, match="verifier, a client, sees only the pipeline's two ends.*transition_audit"):
        IntegrityAuditDefense().install(session)
    node = StageNode(session.server.stages[1], 1, 2, None)
    with pytest.raises(ConfigError, match="use transition_audit"):
        IntegrityAuditDefense().install_server(node)
