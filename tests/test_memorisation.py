"""Memorisation: canaries, the model views, canary exposure, membership, extraction, dp_sgd.

Tiny models and few steps: exposure rises with the number of times a canary was inserted; an adapter trained
on other data gives chance-level membership while the same attack separates its own training records;
dp_sgd's ε comes from Opacus' accountant and, without noise or clipping, it trains like the plain run."""

import math

import numpy as np
import pytest
import torch

from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.canaries import CANARY_PREFIX, Canary, audit_set, insert, make_canaries, space_bits
from suite.experiment.cell import _observations, train_split
from suite.experiment.config import parse_config
from suite.experiment.data import generate_records
from suite.experiment.memorisation import memorisation_fields
from suite.experiment.plan import expand
from suite.interfaces.attack import ATTACKS, make_attack, timed_reconstruct
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import Audit, get_threat
from suite.scoring.memorisation import exposure, exposure_by_rank, membership_summary

MEMORISATION = sorted(n for n in ATTACKS.names() if ATTACKS.get(n).kind == "memorisation")
RAW = {"model": {"name": "tiny-llama"},
       "data": {"max_length": 24, "private": {"generator": "records", "size": 32, "seed": 1},
                "shadow": {"generator": "records", "size": 8, "seed": 2}, "held_out": 16,
                "canaries": {"count": 4, "repeats": [1, 16]}},
       "training": {"clients": 2, "steps": 40, "batch_size": 8, "lr": 1e-2, "strategy": "per_client"}}
CFG = parse_config(RAW)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained(base):
    return train_split(CFG, SplitSpec(1, 1), base, reference=False)


# --- scoring -------------------------------------------------------------------------------------


def test_exposure_is_high_for_a_likely_canary_and_low_for_a_typical_one():
    rng = np.random.default_rng(0)
    cand = rng.normal(50, 3, 10_000)
    assert exposure(50, cand, 40) == pytest.approx(1.0, abs=0.1)  # at the median: half the space is likelier
    far = exposure(35, cand, 40)
    assert far > 10 and far == pytest.approx(exposure_by_rank(38, cand, 40), rel=0.5)
    assert exposure(-1e6, cand, 40) == 40  # capped at the space's size


def test_exposure_when_every_candidate_scores_the_same():
    same = [50.0] * 10
    assert exposure(60, same, 40) == 0.0  # the canary is less likely than every candidate
    assert exposure(50, same, 40) == 1.0  # as likely as all of them
    assert exposure(40, same, 40) == 40  # likelier than all: the whole space


def test_membership_summary_chance_and_separation():
    rng = np.random.default_rng(1)
    same = membership_summary(rng.normal(size=2000), rng.normal(size=2000))
    assert same["auc_lo"] < 0.5 < same["auc_hi"]
    assert same["tpr_at_0_1pct_fpr"] < 0.02 and same["fp_at_0_1pct_fpr"] == 2 and same["fp_at_1pct_fpr"] == 20
    apart = membership_summary(rng.normal(5, 1, 500), rng.normal(size=500))
    assert apart["auc"] > 0.99 and apart["tpr_at_1pct_fpr"] > 0.9
    assert apart["fp_at_0_1pct_fpr"] == 0  # 500 non-members: TPR at 0.1 % FPR rests on no false positive


# --- canaries and config -------------------------------------------------------------------------


def test_canaries_are_seeded_distinct_and_inserted_repeats_times():
    canaries = make_canaries(5, [1, 10], seed=3)
    assert canaries == make_canaries(5, [1, 10], seed=3) and len({c.secret for c in canaries}) == 10
    assert all(c.text.startswith(CANARY_PREFIX) and len(c.secret) == 14 for c in canaries)
    shard = insert(generate_records(4, 0), canaries)
    assert len(shard) == 4 + 5 * 1 + 5 * 10
    assert sum(r.text == canaries[-1].text for r in shard) == 10
    assert space_bits() == pytest.approx(12 * math.log2(10))


def test_prepared_run_holds_the_canaries_in_the_last_clients_shard(trained):
    private = trained.prepared.private
    texts = [r.text for r in private[-1]]
    for c in trained.prepared.canaries:
        assert texts.count(c.text) == c.repeats
    assert not any(r.text.startswith(CANARY_PREFIX) for r in private[0])


@pytest.mark.parametrize("bad, needle", [({"repeats": [0]}, "repeat counts >= 1"),
                                         ({"repeats": [2, 2]}, "distinct"), ({"cnt": 3}, "unknown key")])
def test_bad_canary_config_is_a_one_line_error(bad, needle):
    raw = {**RAW, "data": {**RAW["data"], "canaries": bad}}
    with pytest.raises(ConfigError, match=needle) as err:
        parse_config(raw)
    assert "data.canaries" in str(err.value) and "\n" not in str(err.value)


def test_audit_queries_hide_the_labels():
    members, non = generate_records(6, 1), generate_records(6, 9)
    audit = audit_set([], members, non, seed=0)
    assert sorted(audit.queries) == sorted(r.text for r in members + non)
    assert [q in {r.text for r in members} for q in audit.queries] == list(audit.is_member)


# --- threats, views ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEMORISATION)
def test_memorisation_attacks_need_a_model_view(name):
    for threat in ("eavesdropper", "peer_client"):
        with pytest.raises(ConfigError, match="does not grant"):
            make_attack(name, get_threat(threat))
    for threat in ("adapter_thief", "model_user", "curious_server", "colluding_client"):
        make_attack(name, get_threat(threat))


def test_matrix_leaves_out_memorisation_cells_without_a_view():
    cfg = parse_config({**RAW, "matrix": {"splits": [1], "threats": ["eavesdropper", "adapter_thief", "model_user"],
                                          "attacks": ["membership"], "defenses": ["none"]}})
    cells, skipped = expand(cfg)
    assert {c.threat for c in cells} == {"adapter_thief", "model_user"}
    assert [c.threat for c, _ in skipped] == ["eavesdropper"] and "server_adapters" in skipped[0][1]


def test_views_are_granted_by_the_threat(base, trained):
    def obs(threat):
        return _observations(get_threat(threat), SplitSpec(1, 1), base, CFG, trained.shadow, trained.prepared,
                             None, attack=make_attack("membership", get_threat(threat)))

    thief, user, colluder = obs("adapter_thief"), obs("model_user"), obs("colluding_client")
    assert thief.server_adapters is not None and thief.released_model is None and thief.batches is None
    assert user.released_model is not None and user.server_adapters is None and user.colluder_model is None
    assert colluder.colluder_model is not None and colluder.released_model is None
    # per_client: the thief's trunk has the canary victim's (the last client's) adapter set active
    trunk = thief.server_adapters()
    active = {tuple(m.active_adapters) for m in trunk.modules() if hasattr(m, "lora_A")}
    assert active == {("client1",)}


def test_an_explicit_view_the_threat_lacks_is_refused(base, trained):
    attack = make_attack("membership", get_threat("adapter_thief"), {"view": "released_model"})
    with pytest.raises(ConfigError, match="grants no model view"):
        memorisation_fields(trained, get_threat("adapter_thief"), attack, CFG)


# --- the sanity checks of the issue --------------------------------------------------------------


def test_exposure_rises_with_repeats(trained):
    threat = get_threat("adapter_thief")
    fields = memorisation_fields(trained, threat, make_attack("canary_exposure", threat), CFG)
    by = fields["memorisation"]["by_repeats"]
    assert fields["memorisation"]["view"] == "server_adapters" and fields["memorisation"]["candidates"] >= 10_000
    assert by["16"]["exposure"] > by["1"]["exposure"] + 1.0, by
    assert fields["exposure_lo"] <= fields["exposure"] <= fields["exposure_hi"]


def test_membership_separates_members_and_is_at_chance_on_an_adapter_trained_on_other_data(base, trained):
    threat = get_threat("model_user")
    own = memorisation_fields(trained, threat, make_attack("membership", threat, {"signal": "loss"}), CFG)
    assert own["auc"] > 0.65 and own["auc_lo"] > 0.5, own["auc"]
    assert set(own["memorisation"]["signals"]) == {"loss", "zlib", "min_k_plus_plus", "reference"}
    # the server's adapters (and the model) asked about records they never saw, split into "members" and
    # "non-members" at random: an adapter trained on other data gives chance-level membership
    others = generate_records(200, 77)
    audit = audit_set([], others[:100], others[100:], seed=0)
    labels = np.asarray(audit.is_member)
    for name in ("adapter_thief", "model_user"):
        threat = get_threat(name)
        attack = make_attack("membership", threat, {"signal": "loss"})
        obs = _observations(threat, SplitSpec(1, 1), base, CFG, trained.shadow, trained.prepared, None, None,
                            attack, Audit("", "#", queries=audit.queries))
        recon, _ = timed_reconstruct(attack, obs)
        for signal, scores in recon.extra["scores"].items():
            s = np.asarray(scores)
            summary = membership_summary(s[labels], s[~labels])
            assert summary["auc_lo"] < 0.5 < summary["auc_hi"], (name, signal, summary["auc"])


def test_extraction_recovers_a_canary_the_model_was_made_to_memorise(base):
    cfg = parse_config({**RAW, "data": {**RAW["data"], "canaries": {"count": 1, "repeats": [200]}},
                        "training": {**RAW["training"], "steps": 60, "finetune": "full", "lr": 3e-3}})
    trained = train_split(cfg, SplitSpec(1, 1), base, reference=False)
    threat = get_threat("model_user")
    fields = memorisation_fields(trained, threat, make_attack("extraction", threat, {"beams": 4}), cfg)
    assert fields["extracted"] == 1.0, fields["memorisation"]["guesses"]
    assert fields["memorisation"]["by_repeats"]["200"]["extracted"] == 1.0


# --- dp_sgd --------------------------------------------------------------------------------------


def test_dp_sgd_epsilon_comes_from_the_opacus_accountant(base):
    from opacus.accountants import RDPAccountant

    cfg = parse_config({**RAW, "data": {**RAW["data"], "canaries": None}, "training": {**RAW["training"], "steps": 3}})
    defense = make_defense("dp_sgd", {"sigma": 1.0, "clip": 1.0})
    train_split(cfg, SplitSpec(1, 1), base, defense=defense, reference=False)
    report = defense.report()
    accountant = RDPAccountant()
    accountant.history = [(1.0, 8 / 16, 3)]  # batch 8 of 16 records per client, 3 steps
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert report["epsilon_without_amplification"] > report["epsilon"]
    assert "server itself" in report["does_not_cover"]
    more = make_defense("dp_sgd", {"sigma": 4.0, "clip": 1.0})
    train_split(cfg, SplitSpec(1, 1), base, defense=more, reference=False)
    assert more.report()["epsilon"] < report["epsilon"]


@pytest.mark.parametrize("target", ["server", "clients"])
def test_dp_sgd_without_noise_or_clipping_trains_like_the_plain_run_and_noise_changes_it(base, target, monkeypatch):
    import suite.engine.parties as parties

    cfg = parse_config({**RAW, "data": {**RAW["data"], "canaries": None}, "training": {**RAW["training"], "steps": 2}})
    # dp_sgd trains on each record's own token mean (its gradient bounded by clip): the plain run it must equal
    # is the same loss without DP (the token mean over the whole batch differs where rows' lengths differ)
    with monkeypatch.context() as m:
        m.setattr(parties, "causal_lm_loss", parties.per_record_lm_loss)
        plain = train_split(cfg, SplitSpec(1, 1), base, reference=False)
        assert plain.prepared.session.clients[0].loss is parties.per_record_lm_loss
    free = train_split(cfg, SplitSpec(1, 1), base, reference=False,
                       defense=make_defense("dp_sgd", {"sigma": 0.0, "clip": 1e6, "target": target}))
    noisy = train_split(cfg, SplitSpec(1, 1), base, reference=False,
                        defense=make_defense("dp_sgd", {"sigma": 1.0, "clip": 0.01, "target": target}))
    def flat(run):
        return [x for step in run.prepared.session.losses for x in step]

    assert flat(free) == pytest.approx(flat(plain), abs=1e-5)

    def weights(run):  # the noised party's trainable weights
        session = run.prepared.session
        part = session.server.trunk if target == "server" else session.clients[0].head
        return torch.cat([p.detach().flatten() for p in part.parameters() if p.requires_grad])

    # clipped and noised, the target's updates differ from the plain run's (the loss after 2 steps may not show it)
    assert (weights(noisy) - weights(plain)).abs().max() > 1e-4
    assert (weights(free) - weights(plain)).abs().max() < 1e-5


@pytest.mark.parametrize("params, needle", [({"target": "tail"}, "target must be"), ({"clip": 0}, "clip must be > 0"),
                                            ({"sigma": -1}, "sigma must be >= 0")])
def test_dp_sgd_bad_parameters_are_one_line_errors(params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_defense("dp_sgd", params)


def test_canary_exposure_refuses_too_few_candidates():
    with pytest.raises(ConfigError, match="candidates must be >= 10000"):
        make_attack("canary_exposure", get_threat("adapter_thief"), {"candidates": 100})


def test_memorisation_attacks_are_not_scored_as_reconstructions(trained):
    from suite.experiment.cell import attack_trained

    threat = get_threat("model_user")
    with pytest.raises(ValueError, match="reads a trained model"):
        attack_trained(trained, threat, make_attack("membership", threat), CFG)


def test_canary_record_round_trip():
    c = Canary("1234-5678-9012", 3)
    assert c.record().pii == {"account": "1234-5678-9012"} and c.record().text == CANARY_PREFIX + c.secret


def test_auto_reads_every_granted_view_and_reports_the_one_that_reads_most(base, trained):
    threat = get_threat("colluding_client")
    obs = _observations(threat, SplitSpec(1, 1), base, CFG, trained.shadow, trained.prepared, None,
                        attack=make_attack("membership", threat))
    # per_client: the colluder's view is its own model (its head, tail and trunk adapter set), not a mix
    _, trunk, _ = obs.colluder_model()
    assert {tuple(m.active_adapters) for m in trunk.modules() if hasattr(m, "lora_A")} == {("client0",)}
    fields = memorisation_fields(trained, threat, make_attack("canary_exposure", threat), CFG)
    views = fields["memorisation"]["views"]
    assert set(views) == {"colluder_model", "server_adapters"}  # both granted, both read
    assert fields["exposure"] == max(views.values())
    assert fields["memorisation"]["view"] == max(views, key=views.get)


def test_dp_sgd_noise_comes_from_a_fresh_stream_not_the_seeded_torch_generator():
    """Two optimisers under the same torch seed draw different noise: the run's seed, which the config (and
    so the server) knows, cannot regenerate it."""
    import torch

    from defenses.dp_sgd import _stream_dp_optimizer

    noises = []
    for _ in range(2):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(64))
        opt = _stream_dp_optimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                   expected_batch_size=1)
        p.summed_grad = torch.zeros(64)
        opt.add_noise()
        noises.append(p.grad.clone())
    assert noises[0].std() > 0.5 and not torch.equal(noises[0], noises[1])
