"""Every registered attack, on an undefended tiny split: beats chance under the least-privileged threat that
grants what it needs, and is refused under a threat that grants less. The list comes from the registry."""

import pytest

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import ATTACKS, make_attack
from suite.interfaces.threats import THREATS, Capability, Observations, get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 16, "private": {"generator": "records", "size": 12, "seed": 1},
             "shadow": {"generator": "records", "size": 48, "seed": 2}},
    "training": {"clients": 2, "steps": 4, "batch_size": 4, "lr": 0.005},
})


def _least_privileged(attack_cls):
    fits = [t for t in THREATS.values() if not t.missing(attack_cls.requires)]
    return min(fits, key=lambda t: len(t.grants)) if fits else None


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", num_layers=4)


@pytest.fixture(scope="module")
def honest(base):
    """One honest training run (every client captured), shared by the passive attacks of every threat."""
    return train_split(CFG, SplitSpec(1, 1), base)


INVERSIONS = [n for n in ATTACKS.names() if ATTACKS.get(n).kind == "inversion" and "training" in ATTACKS.get(n).modes]


@pytest.mark.parametrize("name", INVERSIONS)
def test_attack_beats_chance_on_undefended_split(name, base, honest):
    cls = ATTACKS.get(name)
    threat = _least_privileged(cls)
    assert threat is not None, f"no threat preset grants what {name} needs"
    attack = make_attack(name, threat)
    trained = train_split(CFG, SplitSpec(1, 1), base, threat, attack) if cls.active else honest
    result = attack_trained(trained, threat, attack, CFG)
    chance = 1.0 / base.model.config.vocab_size
    assert result.metrics.token_accuracy > 5 * chance, (name, threat.name, result.metrics)
    victims = trained.capture.of([c for c in range(2) if c != threat.colluder])
    assert len(result.reconstruction.texts) == len(result.references) == victims.true_ids.shape[0]
    assert result.cost.seconds >= 0 and result.cost.peak_rss_mib > 0


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_exceeding_its_threat_is_refused(name):
    cls = ATTACKS.get(name)
    for threat in THREATS.values():
        if cls.missing_for(threat):
            with pytest.raises(ConfigError, match="does not grant"):
                make_attack(name, threat)


def test_observations_hold_only_what_is_granted(base, honest):
    threat = get_threat("eavesdropper")
    trained = honest
    from suite.experiment.cell import _observations

    obs = _observations(threat, SplitSpec(1, 1), base, CFG, trained.shadow, trained.prepared, trained.capture)
    assert obs.batches is None and obs.colluder_records is None and obs.frames
    server = _observations(get_threat("curious_server"), SplitSpec(1, 1), base, CFG, trained.shadow,
                           trained.prepared, trained.capture)
    assert server.frames is None and server.batches and server.batches[0].gradient is not None
    with pytest.raises(ConfigError, match="does not grant"):
        Observations(threat=threat, spec=SplitSpec(1, 1), tokenizer=None, max_length=8, batches=server.batches)


def test_nearest_embedding_recovers_everything_at_k0(base):
    threat = get_threat("curious_server")
    attack = make_attack("nearest_embedding", threat)
    trained = train_split(CFG, SplitSpec(0, 1), base)
    result = attack_trained(trained, threat, attack, CFG)
    assert result.metrics.token_accuracy >= 0.99


def test_unknown_attack_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'nearest_embedding'"):
        make_attack("nearest_embeding", get_threat("curious_server"))


def test_unknown_attack_parameter_is_refused():
    with pytest.raises(ConfigError, match="no parameter 'bogus'"):
        make_attack("nearest_embedding", get_threat("curious_server"), {"bogus": 1})


def test_threat_presets_are_well_formed():
    assert set(THREATS) == {"curious_server", "malicious_server", "colluding_client", "eavesdropper", "peer_client",
                            "adapter_thief", "model_user", "curious_stage", "malicious_stage", "colluding_stages",
                            "memory_dump"}
    assert Capability.CONTROL_SERVER in THREATS["malicious_server"].grants
    assert Capability.CONTROL_SERVER not in THREATS["curious_server"].grants
    assert THREATS["eavesdropper"].grants.isdisjoint({Capability.ACTIVATIONS, Capability.GRADIENTS})


def test_colluding_client_victims_exclude_the_colluder(base, honest):
    threat = get_threat("colluding_client")
    result = attack_trained(honest, threat, make_attack("nearest_embedding", threat), CFG)
    victim_rows = honest.capture.of([1])
    assert result.references == [honest.base.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                                 for r, m in zip(victim_rows.true_ids, victim_rows.mask, strict=True)]


def test_gradient_inversion_keeps_the_best_iterate_when_richardson_diverges(base):
    """Blocks far from the identity (as in pretrained LMs with massive activations) make the Richardson solve
    diverge; the attack must then keep its first-order guess instead of decoding garbage."""
    import copy

    import torch

    from attacks.gradient_inversion import label_gradient
    from suite.engine.split import position_ids_for, split_model

    model = copy.deepcopy(base.model)
    tail = split_model(model, SplitSpec(1, 1)).client_tail
    torch.manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.long)
    h = torch.randn(2, 6, model.config.hidden_size)
    grad = torch.randn_like(h)

    def residual(r_z, known_z):
        hh = h.clone().requires_grad_(True)
        z = tail.blocks(hh, mask, position_ids_for(mask))
        return (grad - torch.autograd.grad(z, hh, known_z - r_z)[0]).norm()

    with torch.no_grad():
        for p in tail.blocks.parameters():
            p.mul_(40.0)  # B = I + (large): the plain iteration blows up
    first, _, _ = label_gradient(tail, h, mask, grad, solve_steps=0)
    solved, _, _ = label_gradient(tail, h, mask, grad, solve_steps=8)
    assert torch.isfinite(solved).all()
    known, _, _ = label_gradient(tail, h, mask, torch.zeros_like(grad), solve_steps=0)  # R_Z of G = 0 is A_Z
    assert residual(solved, known) <= residual(first, known) + 1e-4


def test_wire_inversion_inner_attack_and_its_defaults():
    eavesdropper = get_threat("eavesdropper")
    default = make_attack("wire_inversion", eavesdropper).config.inner_config()
    assert type(default).__name__ == "LearnedInversionConfig" and default.mode == "linear"
    neural = make_attack("wire_inversion", eavesdropper, {"inner_params": {"mode": "neural"}}).config.inner_config()
    assert neural.mode == "neural"
    plain = make_attack("wire_inversion", eavesdropper, {"inner": "nearest_embedding"}).config.inner_config()
    assert type(plain).__name__ == "NearestEmbeddingConfig"
    with pytest.raises(ConfigError, match="inner_params for 'nearest_embedding'"):
        make_attack("wire_inversion", eavesdropper, {"inner": "nearest_embedding", "inner_params": {"mode": "x"}})
    with pytest.raises(ConfigError, match="unknown inner attack"):
        make_attack("wire_inversion", eavesdropper, {"inner": "nope"})
