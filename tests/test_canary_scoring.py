"""The memorisation attacks' scoring shortcuts. Canary exposure: candidates share the canary's prefix,
which runs once with its KV cache reused for every secret; it gives the same log-perplexities, hence the same
exposure, as running every text whole, on each model view (the server's LoRA trunk included). Membership: the
base model's reference scores are computed once per process for the same weights and records."""

import pytest

import attacks.membership as membership
from attacks.toolkit.memorise import cached_prefix_lppl, open_view, token_stats
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec
from suite.experiment.canaries import CANARY_PREFIX, random_secret
from suite.experiment.cell import _observations, train_split
from suite.experiment.config import parse_config
from suite.experiment.memorisation import memorisation_fields
from suite.interfaces.attack import make_attack
from suite.interfaces.threats import Audit, get_threat

RAW = {"model": {"name": "tiny-llama"},
       "data": {"max_length": 24, "private": {"generator": "records", "size": 24, "seed": 1},
                "shadow": {"generator": "records", "size": 8, "seed": 2}, "held_out": 8,
                "canaries": {"count": 2, "repeats": [1, 8]}},
       "training": {"clients": 2, "steps": 6, "batch_size": 8, "lr": 1e-2, "strategy": "per_client"}}
CFG = parse_config(RAW)


@pytest.fixture(scope="module")
def trained():
    return train_split(CFG, SplitSpec(1, 1), tiny_model("llama"), reference=False)


@pytest.mark.parametrize("view, max_nodes", [("released_model", 1024), ("released_model", 16),
                                             ("server_adapters", 1), ("server_adapters", 1024)])
def test_cached_prefix_gives_the_plain_log_perplexities(trained, view, max_nodes):
    """Whatever depth the tree of secrets reaches (none, the first digit, every token) before the batches."""
    import random

    threat = get_threat("adapter_thief" if view == "server_adapters" else "model_user")
    attack = make_attack("canary_exposure", threat, {"view": view})
    obs = _observations(threat, trained.prepared.session.split.spec, trained.base, CFG, trained.shadow,
                        trained.prepared, None, trained.defense, attack, Audit(CANARY_PREFIX, "####-####-####"))
    v = open_view(obs, view)
    rng = random.Random(0)
    texts = [CANARY_PREFIX + random_secret(rng) for _ in range(40)]
    texts += ["a record of another length", "x", CANARY_PREFIX + "12"]  # other groups, one with no prefix to share
    plain = [float(-lp.sum()) for lp in token_stats(v.logits, obs.tokenizer, texts, obs.max_length, 16).logp]
    fast = cached_prefix_lppl(v, obs.tokenizer, texts, obs.max_length, batch_size=16, max_nodes=max_nodes)
    assert fast == pytest.approx(plain, rel=1e-5, abs=1e-4)
    assert len(set(round(x, 3) for x in fast[:40])) > 30  # the secrets are scored, not only the prefix


def test_cached_prefix_gives_the_same_exposure(trained):
    threat = get_threat("model_user")
    out = {}
    for cached in (True, False):
        attack = make_attack("canary_exposure", threat, {"view": "released_model", "prefix_cache": cached})
        fields = memorisation_fields(trained, threat, attack, CFG)
        out[cached] = fields["memorisation"]["exposure"]
        assert fields["memorisation"]["candidates"] == 10_000
    assert out[True] == pytest.approx(out[False], abs=1e-3)


def test_membership_reference_scores_are_computed_once_and_equal_a_fresh_computation(trained, monkeypatch):
    threat = get_threat("model_user")
    attack = make_attack("membership", threat, {"view": "released_model"})
    membership._REFERENCE.clear()
    first = memorisation_fields(trained, threat, attack, CFG)["memorisation"]["signals"]["reference"]
    calls = []
    real = membership.token_stats
    monkeypatch.setattr(membership, "token_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = memorisation_fields(trained, threat, attack, CFG)["memorisation"]["signals"]["reference"]
    assert again == first and len(calls) == 1  # the view's own scores only: the reference came from the cache
    membership._REFERENCE.clear()
    assert memorisation_fields(trained, threat, attack, CFG)["memorisation"]["signals"]["reference"] == first
    assert len(calls) == 3


def test_a_four_digit_space_is_ranked_whole_with_its_cap_stated(capsys):
    raw = {**RAW, "data": {**RAW["data"], "canaries": {"count": 2, "repeats": [1, 8], "format": "####"}}}
    cfg = parse_config(raw)
    trained = train_split(cfg, SplitSpec(1, 1), tiny_model("llama"), reference=False)
    assert all(len(c.secret) == 4 for c in trained.prepared.canaries)
    threat = get_threat("model_user")
    attack = make_attack("canary_exposure", threat, {"view": "released_model"})
    detail = memorisation_fields(trained, threat, attack, cfg)["memorisation"]
    assert detail["candidates"] == 10_000 and detail["exposure_method"] == "rank in the whole space"
    assert detail["space_bits"] == pytest.approx(13.2877, abs=1e-4)
    assert all(0 <= e <= detail["space_bits"] for e in detail["exposure"])
    assert detail["exposure"] == detail["exposure_rank"]  # the exact rank, no fit


@pytest.mark.parametrize("fmt", ["###", "####-##a#-1234", "#" * 19])
def test_a_bad_secret_format_is_one_line(fmt):
    from suite.errors import ConfigError

    with pytest.raises(ConfigError, match="secret format of 4 to 18"):
        parse_config({**RAW, "data": {**RAW["data"], "canaries": {"count": 2, "format": fmt}}})
