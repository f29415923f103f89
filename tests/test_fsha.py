"""FSHA on tiny models: the server's reply to the head really is the critic's gradient, not the honest one; the
hijacked model is worse at its task than an honestly trained one; the hijacked features decode far above
chance (and above what the same decoder reads from an honest run); the attack is refused without control
of the server."""

import copy

import pytest
import torch

from attacks.fsha import FshaConfig, FshaPolicy
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.experiment.data import load_corpus
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import Defense
from suite.interfaces.threats import filter_observations, get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 16, "private": {"generator": "records", "size": 12, "seed": 1},
             "shadow": {"generator": "records", "size": 48, "seed": 2}},
    "training": {"clients": 2, "steps": 30, "batch_size": 4, "lr": 0.001, "finetune": "full"},
})
SPEC = SplitSpec(1, 1)
MALICIOUS = get_threat("malicious_server")


class _Received(Defense):
    """Not a defense: records every gradient the client heads receive from the server."""

    def __init__(self, config=None):
        super().__init__(config)
        self.grads: list[torch.Tensor] = []

    def install(self, session) -> None:
        def keep(step, grad, head_out, batch):
            self.grads.append(grad.clone())
            return grad

        for client in session.clients:
            client.gradient_hooks.append(keep)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", num_layers=4)


@pytest.fixture(scope="module")
def honest(base):
    return train_split(CFG, SPEC, base)


@pytest.fixture(scope="module")
def hijacked(base):
    """One hijacked run; records what the policy was given (honest) and what it returned, and what the
    clients received."""
    replies: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = FshaPolicy.head_gradient

    def recording(self, client_ids, step, hidden_in, attention_mask, honest_grad):
        out = original(self, client_ids, step, hidden_in, attention_mask, honest_grad)
        replies.append((honest_grad.clone(), out.clone()))
        return out

    attack = make_attack("fsha", MALICIOUS)
    received = _Received()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FshaPolicy, "head_gradient", recording)
        trained = train_split(CFG, SPEC, base, MALICIOUS, attack, received)
    return trained, attack, replies, received.grads


def test_clients_receive_the_critic_gradient_not_the_honest_one(hijacked):
    trained, attack, replies, received = hijacked
    steps = CFG.training.steps * CFG.training.clients + len(trained.capture.batches)  # training, then capture
    assert len(replies) == len(received) == steps == attack.policy.hijacked
    cosines = []
    for (honest, sent), got in zip(replies, received, strict=True):
        assert torch.equal(got, sent)  # what the head trained on is the policy's reply, byte for byte
        assert not torch.allclose(sent, honest)
        cosines.append(float(torch.nn.functional.cosine_similarity(sent.flatten(), honest.flatten(), dim=0)))
        # Same size as the honest reply (so it does not stand out by its norm), row by row.
        torch.testing.assert_close(sent.flatten(1).norm(dim=1), honest.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-8)
    assert abs(sum(cosines) / len(cosines)) < 0.3, cosines  # unrelated to the task gradient


def test_padding_positions_get_no_gradient(base):
    shadow = tuple(r.text for r in load_corpus(CFG.data.shadow.spec()))
    obs = filter_observations(MALICIOUS, spec=SPEC, tokenizer=base.tokenizer, max_length=16,
                              base_model=lambda: copy.deepcopy(base.model), shadow=shadow)
    policy = FshaPolicy(FshaConfig(warmup_steps=2), obs)
    hidden = torch.randn(3, 16, base.model.config.hidden_size)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 10:] = 0
    honest = torch.randn_like(hidden)
    reply = policy.head_gradient([0], 0, hidden, mask, honest)
    assert reply.shape == honest.shape and torch.isfinite(reply).all()
    assert reply[1, 10:].abs().sum() == 0 and reply[1, :10].abs().sum() > 0


def test_a_second_identical_warm_up_is_a_copy_of_the_first(base):
    shadow = tuple(r.text for r in load_corpus(CFG.data.shadow.spec()))
    obs = filter_observations(MALICIOUS, spec=SPEC, tokenizer=base.tokenizer, max_length=16,
                              base_model=lambda: copy.deepcopy(base.model), shadow=shadow)
    cfg = FshaConfig(warmup_steps=5, seed=3)
    first, second = FshaPolicy(cfg, obs), FshaPolicy(cfg, obs)
    assert not first.warmup_reused and second.warmup_reused
    hidden = torch.randn(2, 16, base.model.config.hidden_size)
    mask = torch.ones(2, 16, dtype=torch.long)
    honest = torch.randn_like(hidden)
    # Same replies, and the copy is independent: training one does not move the other.
    torch.testing.assert_close(first.head_gradient([0], 0, hidden, mask, honest),
                               second.head_gradient([0], 0, hidden, mask, honest), rtol=0, atol=0)
    assert first.decoder is not second.decoder and first.ae_loss == second.ae_loss
    fresh = FshaPolicy(FshaConfig(warmup_steps=5, seed=4), obs)  # another config: its own warm-up
    assert not fresh.warmup_reused


def test_hijacking_hurts_the_task(honest, hijacked):
    trained = hijacked[0]
    assert trained.utility > honest.utility + 0.1, (trained.utility, honest.utility)


def test_hijacked_features_decode_above_chance_and_above_passive_decoding(base, honest, hijacked):
    trained, attack, _, _ = hijacked
    result = attack_trained(trained, MALICIOUS, attack, CFG)
    chance = 1.0 / base.model.config.vocab_size
    assert result.metrics.token_accuracy > 0.5 > 100 * chance, result.metrics
    assert result.reconstruction.extra["hijacked_batches"] == attack.policy.hijacked > 0
    # The same server networks trained while replying honestly read much less from the honest run's traffic:
    # the gain comes from the hijacking, not from the decoder alone.
    passive = make_attack("fsha", MALICIOUS, {"hijack": False})
    passive_run = train_split(CFG, SPEC, base, MALICIOUS, passive)
    assert passive_run.utility == pytest.approx(honest.utility, abs=1e-4)  # replying honestly is honest
    passive_result = attack_trained(passive_run, MALICIOUS, passive, CFG)
    assert result.metrics.token_accuracy > passive_result.metrics.token_accuracy + 0.2


def test_refused_without_control_of_the_server():
    with pytest.raises(ConfigError, match="control_server"):
        make_attack("fsha", get_threat("curious_server"))
    with pytest.raises(ConfigError, match="does not grant"):
        make_attack("fsha", get_threat("colluding_client"))


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="fsha"):
        make_attack("fsha", MALICIOUS, {"disc_lr": 0})
    with pytest.raises(ConfigError, match="no parameter"):
        make_attack("fsha", MALICIOUS, {"lambda": 1})
