"""The blind baseline: sees only public shadow text and lengths, returns the victims' shape, and on template
text beats a uniform random guess by far (what an attacker gets without observing anything)."""

import pytest
import torch

from attacks.blind import BlindAttack, BlindConfig
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.threats import Capability, get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 16, "private": {"generator": "records", "size": 12, "seed": 1},
             "shadow": {"generator": "records", "size": 64, "seed": 2}},
    "training": {"clients": 2, "steps": 1, "batch_size": 4},
})


def test_blind_needs_only_public_text():
    assert BlindAttack.requires == frozenset({Capability.SHADOW_DATA})
    assert Capability.ACTIVATIONS not in BlindAttack.uses and Capability.GRADIENTS not in BlindAttack.uses


@pytest.fixture(scope="module")
def trained():
    return train_split(CFG, SplitSpec(1, 1), tiny_model("llama", num_layers=2))


def test_blind_gets_the_victims_shape_and_beats_a_random_guess(trained):
    base = trained.base
    for threat_name in ("eavesdropper", "colluding_client"):
        threat = get_threat(threat_name)
        result = attack_trained(trained, threat, make_attack("blind", threat), CFG)
        victims = trained.capture.of([c for c in range(2) if c != threat.colluder])
        assert result.reconstruction.token_ids.shape == victims.true_ids.shape
        assert len(result.reconstruction.texts) == victims.true_ids.shape[0]
        # a uniform random guess over the vocabulary gets ~1/V of the tokens; the template's fixed words
        # ("Name:", "Phone:", ...) give the blind prior far more
        rand = torch.randint(0, base.model.config.vocab_size, victims.true_ids.shape,
                             generator=torch.Generator().manual_seed(0))
        real = victims.mask.bool()
        random_acc = float(((rand == victims.true_ids) & real).sum() / real.sum())
        assert result.metrics.token_accuracy > max(0.03, 5 * random_acc), (result.metrics, random_acc)
        assert result.reconstruction.extra["candidate"] in ("position_prior", "length_prior", "lm_greedy")


def test_blind_does_not_read_the_victims_activations(trained):
    threat = get_threat("curious_server")
    attack = make_attack("blind", threat, {"candidate": "length_prior"})
    first = attack_trained(trained, threat, attack, CFG)
    for b in trained.capture.batches:  # scramble what the server saw: the blind guess must not move
        b.hidden.normal_()
    second = attack_trained(trained, threat, attack, CFG)
    assert torch.equal(first.reconstruction.token_ids, second.reconstruction.token_ids)


def test_blind_config_is_checked():
    with pytest.raises(ValueError, match="candidate"):
        BlindConfig(candidate="oracle")
