"""Defence-aware attackers: the defences' attacker simulations, attacks handed only
what they declare, the adaptive attacker beating the naive one under DxP, and the eavesdropper using every
frame a plaintext wire carries (and nothing under encryption)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.parties import Batch
from suite.engine.split import SplitSpec, position_ids_for, split_model
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import Attack, Reconstruction, make_attack
from suite.interfaces.defense import make_defense, public_defense
from suite.interfaces.threats import Capability, get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 16, "private": {"generator": "records", "size": 12, "seed": 1},
             "shadow": {"generator": "records", "size": 96, "seed": 2}},
    "training": {"clients": 2, "steps": 4, "batch_size": 4, "lr": 0.005},
})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", num_layers=4)


def _head(base):
    model = copy.deepcopy(base.model)
    model.requires_grad_(False)
    return split_model(model, SplitSpec(1, 1)).client_head.eval()


def _inputs(n=32, t=10):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 200, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::3, 7:] = 0
    return ids, mask


# -- the defences' attacker simulations ------------------------------------------------------------------------

def test_dp_simulate_release_matches_the_mechanism_but_not_the_clients_noise(base):
    head = _head(base)
    ids, mask = _inputs()
    defense = make_defense("dp_gaussian", {"sigma": 0.7, "clip": 0.2, "seed": 3})
    assert "seed" not in defense.public_params()  # the noise seed is secret; sigma and clip are public
    # The client's release, through the hook the defense installs on a client.
    client = SimpleNamespace(id=0, activation_hooks=[], head=head, tail=torch.nn.Identity(), optimizer=None)
    defense.install(SimpleNamespace(clients=[client]))
    with torch.no_grad():
        plain = head(ids, mask, position_ids_for(mask))
        sent = client.activation_hooks[0](plain, Batch(ids, mask, ids))
    attacker = public_defense(defense)
    sim = attacker.simulate_release(head, ids, mask, torch.Generator().manual_seed(11))
    m = mask.unsqueeze(-1).float()
    # Same clipping: the clipped signal has norm C per sequence (these outputs are far above C).
    norms = (plain * m).flatten(1).norm(dim=1)
    assert torch.all(norms > 0.2)
    clipped = plain * (0.2 / norms).view(-1, 1, 1)
    noise = (sim - clipped)[mask.bool()]
    assert float(noise.std()) == pytest.approx(0.7 * 2 * 0.2, rel=0.05)  # sigma x sensitivity (2C)
    assert torch.all(sim[~mask.bool()] == 0)  # padding is released as zeros, as the client's hook does
    # ... but not the client's noise: independent draws, no better correlated than chance.
    client_noise = (sent - clipped)[mask.bool()].flatten()
    corr = torch.corrcoef(torch.stack([noise.flatten(), client_noise]))[0, 1]
    assert abs(float(corr)) < 0.05
    # The attacker's simulation is reproducible from its own generator only.
    again = attacker.simulate_release(head, ids, mask, torch.Generator().manual_seed(11))
    assert torch.equal(sim, again)


def test_dxp_simulate_release_noises_the_embeddings_with_the_public_eta(base):
    head = _head(base)
    ids, mask = _inputs()
    defense = public_defense(make_defense("dxp", {"eta": 300.0, "seed": 9}))
    sim = defense.simulate_release(head, ids, mask, torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = head(ids, mask, position_ids_for(mask))
    assert sim.shape == plain.shape and not torch.allclose(sim, plain)
    # k = 0 exposes the noise itself: E||z|| = H / eta.
    head0 = split_model(copy.deepcopy(base.model), SplitSpec(0, 1)).client_head.eval().requires_grad_(False)
    z = defense.simulate_release(head0, ids, mask, torch.Generator().manual_seed(2)) - head0.embed(ids)
    hsize = z.shape[-1]
    assert float(z[mask.bool()].norm(dim=-1).mean()) == pytest.approx(hsize / 300.0, rel=0.05)
    assert torch.all(z[~mask.bool()] == 0)


def test_nopeek_simulate_head_trains_a_copy_and_leaves_the_head_alone(base):
    head = _head(base)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    ids, mask = _inputs()
    defense = public_defense(make_defense("nopeek", {"alpha": 0.5}))
    sim = defense.simulate_head(head, ids, mask, torch.Generator().manual_seed(0))
    assert sim is not head
    after = head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the passed head is untouched
    assert not all(torch.equal(before[k], v) for k, v in sim.state_dict().items())  # the copy was trained
    assert not any(p.requires_grad for p in head.parameters())


# -- attacks receive only what they declare ---------------------------------------------------------------------

class _ShadowOnlyAttack(Attack):  # not registered: the registry-driven tests must not pick it up
    name = "shadow_only_probe"
    requires = frozenset({Capability.SHADOW_DATA})

    def reconstruct(self, obs):
        self.seen = obs
        return Reconstruction(torch.zeros(len(obs.lengths), CFG.data.max_length, dtype=torch.long),
                              ("",) * len(obs.lengths))


@pytest.fixture(scope="module")
def honest(base):
    return train_split(CFG, SplitSpec(1, 1), base)


def test_attack_receives_only_what_it_declares(honest):
    threat = get_threat("curious_server")
    attack = _ShadowOnlyAttack()
    attack_trained(honest, threat, attack, CFG)
    obs = attack.seen
    assert obs.batches is None and obs.frames is None and obs.base_model is None
    assert obs.colluder_head_tail is None and obs.colluder_records is None
    assert obs.shadow  # what it requires comes
    assert obs.lengths is not None and obs.defense is not None and obs.tokenizer is not None  # public fields stay
    # An attack using the colluder's weights when granted still gets them.
    cls = type("_ColluderProbe", (_ShadowOnlyAttack,), {"uses": frozenset({Capability.COLLUDER_WEIGHTS})})
    probe = cls()
    attack_trained(honest, get_threat("colluding_client"), probe, CFG)
    assert probe.seen.colluder_head_tail is not None and probe.seen.batches is None


# -- defence-aware attackers -------------------------------------------------------------------------------------

def test_adaptive_attacker_beats_the_naive_one_under_dxp(base):
    # eta = 100 on the tiny model: noise norm H / eta = 0.64, about 4x the mean embedding norm (0.16).
    trained = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dxp", {"eta": 100.0}))
    threat = get_threat("curious_server")
    naive = attack_trained(trained, threat, make_attack("learned_inversion", threat,
                                                        {"mode": "linear", "adaptive": False}), CFG)
    adaptive = attack_trained(trained, threat, make_attack("learned_inversion", threat, {"mode": "linear"}), CFG)
    assert naive.adaptive is False and adaptive.adaptive is True
    assert adaptive.reconstruction.extra["simulated_defense"] is True
    assert adaptive.metrics.token_accuracy >= naive.metrics.token_accuracy + 0.03, (
        naive.metrics.token_accuracy, adaptive.metrics.token_accuracy, adaptive.reconstruction.extra["choice"])


def test_adaptive_attack_without_a_defense_is_the_plain_attack(honest):
    threat = get_threat("curious_server")
    a = attack_trained(honest, threat, make_attack("learned_inversion", threat, {"mode": "linear"}), CFG)
    b = attack_trained(honest, threat, make_attack("learned_inversion", threat,
                                                   {"mode": "linear", "adaptive": False}), CFG)
    assert torch.equal(a.reconstruction.token_ids, b.reconstruction.token_ids)
    assert a.reconstruction.extra["simulated_defense"] is False


# -- the eavesdropper uses every frame a plaintext wire carries ------------------------------------------------

def test_eavesdropper_uses_gradients_on_a_plaintext_wire_and_nothing_under_encryption(base):
    eaves = get_threat("eavesdropper")
    dp = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", {"sigma": 0.5, "clip": 1.0}))
    wire = attack_trained(dp, eaves, make_attack("wire_inversion", eaves), CFG)
    ex = wire.reconstruction.extra
    assert ex["parsed_gradients"] == ex["parsed_activations"] == len(dp.capture.batches) > 0
    assert ex["tokens_from_gradients"] > 0
    server = get_threat("curious_server")
    grad = attack_trained(dp, server, make_attack("gradient_inversion", server), CFG)
    # Under DP the activations are noise, the gradients are not: the eavesdropper reads what the server reads.
    assert wire.metrics.token_accuracy >= grad.metrics.token_accuracy - 1e-9
    assert wire.metrics.token_accuracy > 0.5

    enc = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("encryption"))
    sealed = attack_trained(enc, eaves, make_attack("wire_inversion", eaves), CFG)
    ex = sealed.reconstruction.extra
    assert ex["parsed_gradients"] == ex["parsed_activations"] == 0 and ex["unparsed_frames"] > 0
    assert sealed.reconstruction.token_ids.numel() == 0 and "ciphertext" in sealed.reconstruction.note
    assert sealed.metrics.token_accuracy == 0.0


def test_lm_prior_beam_with_its_kv_cache_finds_the_exhaustive_optimum():
    """With a beam as wide as every prefix, the cached beam search returns the exact argmax of
    ``sum_t score + weight * log p_LM`` found by scoring every sequence with a full forward (no cache)."""
    import itertools

    from attacks.toolkit.decoding import LMPrior
    from suite.engine.models import tiny_model

    model = tiny_model("llama").model
    prior = LMPrior(model)
    gen = torch.Generator().manual_seed(4)
    cand = torch.randint(0, model.config.vocab_size, (2, 3, 3), generator=gen)
    scores = torch.randn(2, 3, 3, generator=gen)
    mask = torch.ones(2, 3, dtype=torch.long)
    got = prior.beam(scores, cand, mask, weight=2.0, width=9)
    for n in range(2):
        best, arg = -float("inf"), None
        for choice in itertools.product(range(3), repeat=3):
            seq = torch.tensor([[int(cand[n, t, c]) for t, c in enumerate(choice)]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
            total = sum(float(scores[n, t, c]) for t, c in enumerate(choice))
            total += 2.0 * sum(float(logp[t - 1, seq[0, t]]) for t in range(1, 3))
            if total > best:
                best, arg = total, seq[0]
        assert torch.equal(got[n], arg), (n, got[n], arg)
