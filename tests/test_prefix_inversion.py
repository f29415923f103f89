"""Prefix inversion (SipIt-style search with a KV cache) and BiSR on tiny models built from configs."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from attacks.toolkit.prefix.options import PrefixOptions
from attacks.toolkit.prefix.scorer import Scorer
from attacks.toolkit.prefix.search import PrefixSearch
from suite.engine.models import tiny_model
from suite.engine.split import SplitSpec, position_ids_for, split_model
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat

FAMILIES = ["llama", "gpt2", "gpt_neox", "gemma"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_incremental_head_with_kv_cache_equals_full_forward(family, k):
    loaded = tiny_model(family, num_layers=4)
    head = split_model(loaded.model, SplitSpec(k, 1)).client_head.eval()
    ids = torch.randint(0, loaded.model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = head(ids, mask, position_ids_for(mask))
        cache = DynamicCache(config=loaded.model.config)
        steps = [head(ids[:, t : t + 1], mask[:, : t + 1], torch.full((3, 1), t), cache=cache) for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def _exact_search(family: str, k: int, options: PrefixOptions, proposals: bool = True, lm: bool = False):
    """Invert an un-fine-tuned head's output with the same head (what SipIt proves exact)."""
    loaded = tiny_model(family, num_layers=4)
    head = split_model(loaded.model, SplitSpec(k, 1)).client_head.eval()
    head.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a shorter sequence: its padding is never reconstructed
    with torch.no_grad():
        target = head(ids, mask, position_ids_for(mask))
    scorer = Scorer.fit(target, mask)
    search = PrefixSearch(head, loaded.model.config, scorer, options, loaded.model.eval() if lm else None,
                          start_token=0)
    # A proposer that usually misses: random candidates (the truth only by chance), so widening must work.
    prop = torch.randint(0, vocab, (4, 10, options.candidates), generator=gen) if proposals else None
    got, scores = search.run(target, mask, prop)
    return got, ids, mask, search


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_prefix_inversion_of_an_unfinetuned_head_is_exact(family, k):
    got, ids, mask, search = _exact_search(family, k, PrefixOptions(candidates=4, widen=16, widen_rounds=8,
                                                                   widen_below=0.9999))
    real = mask.bool()
    assert torch.equal(got[real], ids[real]), (family, k, (got[real] == ids[real]).float().mean())
    assert search.stats["widened_positions"] > 0  # the random proposer missed: widening found the rest


def test_without_widening_random_candidates_are_not_enough():
    """The control for the test above: the same search with widening off fails, so the test can fail."""
    got, ids, mask, _ = _exact_search("llama", 1, PrefixOptions(candidates=4, widen_rounds=0))
    real = mask.bool()
    assert (got[real] == ids[real]).float().mean() < 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_continuous_step_alone_finds_what_random_candidates_miss(family):
    """SipIt's relaxation as the only widening (no gradient rounds, 4 nearest rows of the optimised embedding
    verified): exact, where the same search without it recovers nothing (random candidates, 0.0 measured)."""
    options = PrefixOptions(candidates=4, widen=4, widen_rounds=0, relax_steps=10, widen_below=0.9999)
    got, ids, mask, search = _exact_search(family, 2, options)
    real = mask.bool()
    assert torch.equal(got[real], ids[real])
    without = PrefixOptions(candidates=4, widen=4, widen_rounds=0, relax_steps=0, widen_below=0.9999)
    got, ids, mask, _ = _exact_search(family, 2, without)
    assert (got[real] == ids[real]).float().mean() < 0.5


def test_the_lm_prior_round_verifies_the_lms_next_tokens():
    """Widening by the public LM alone (no gradient rounds): with every token in its top list the search is
    exact where random candidates alone fail (the control above), so its proposals are verified, per prefix."""
    options = PrefixOptions(candidates=4, widen_rounds=0, prior=10_000, widen_below=0.9999)
    got, ids, mask, search = _exact_search("llama", 1, options, lm=True)
    real = mask.bool()
    assert torch.equal(got[real], ids[real])
    assert search.stats["widened_positions"] > 0


def test_padding_is_not_searched():
    """Positions after a sequence's end are never verified or widened (sequence 2 ends at 7 of 10): without
    widening the search verifies exactly the proposer's candidates at the real positions."""
    got, ids, mask, search = _exact_search("llama", 1, PrefixOptions(candidates=4, widen_rounds=0))
    assert search.stats["verified"] == 4 * int(mask.sum())
    assert torch.equal(got[~mask.bool()], torch.zeros_like(got[~mask.bool()]))
    _, _, _, widened = _exact_search("llama", 1, PrefixOptions(candidates=4, widen=16, widen_rounds=1,
                                                               widen_below=1.01))  # every real position is poor
    assert widened.stats["verified"] == (4 + 16) * int(mask.sum())


def test_later_widening_rounds_use_their_own_bar():
    """``widen_again_below``: the first round widens where the match is below ``widen_below``; the later
    rounds only where it is still below the second bar (here none: every match is above -1)."""
    opts = dict(candidates=4, widen=16, widen_rounds=3, widen_below=1.01)
    _, _, mask, once = _exact_search("llama", 1, PrefixOptions(**opts, widen_again_below=-1.0))
    assert once.stats["verified"] == (4 + 16) * int(mask.sum())
    _, _, _, thrice = _exact_search("llama", 1, PrefixOptions(**opts))
    assert thrice.stats["verified"] == (4 + 3 * 16) * int(mask.sum())


def test_beam_and_candidate_options():
    options = PrefixOptions(candidates=4, beam=3, widen=16, widen_rounds=8, widen_below=0.9999)
    got, ids, mask, search = _exact_search("llama", 2, options)
    real = mask.bool()
    assert torch.equal(got[real], ids[real])
    # 4 proposer candidates for each of 3 beams at each position, at least.
    assert search.stats["verified"] >= 4 * 3 * int(mask.sum(1).max() - 1)
    with pytest.raises(Exception, match="candidates and beam"):
        make_attack("prefix_inversion", get_threat("curious_server"), {"beam": 0})


CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 32, "seed": 2}},
    "training": {"clients": 2, "steps": 2, "batch_size": 4, "lr": 0.005},
})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", num_layers=4)


def test_prefix_inversion_attack_recovers_a_lightly_trained_split(base):
    threat = get_threat("curious_server")
    trained = train_split(CFG, SplitSpec(1, 1), base)
    attack = make_attack("prefix_inversion", threat, {"widen_rounds": 4})
    result = attack_trained(trained, threat, attack, CFG)
    assert result.metrics.token_accuracy >= 0.9, result.metrics
    assert result.reconstruction.extra["adaptive"] is True


def test_bisr_beats_forward_only_when_activations_are_noised(base):
    """Under DP noise the forward view is drowned; the gradient still carries the labels. BiSR fuses both
    and must recover more than the forward-only prefix inversion on the same capture."""
    threat = get_threat("curious_server")
    defense = make_defense("dp_gaussian", {"sigma": 1.0, "clip": 1.0})
    trained = train_split(CFG, SplitSpec(1, 1), base, defense=defense)
    forward = attack_trained(trained, threat, make_attack("prefix_inversion", threat, {"widen_rounds": 1}), CFG)
    fused = attack_trained(trained, threat, make_attack("bisr", threat, {"widen_rounds": 1}), CFG)
    assert fused.metrics.token_accuracy > forward.metrics.token_accuracy + 0.1, (fused.metrics, forward.metrics)
    assert fused.reconstruction.extra["lambda"] > 0


def test_bisr_re_decides_the_early_positions_on_a_calibrated_head(base):
    """bisr takes prefix_inversion's early-position step on the drift estimate (``calibrate_early``): where the
    search's mean score is below ``calibrate_below`` (here forced above any score) the head is calibrated and
    the early positions re-decided on it with the fused score; ``calibrate_early = 0`` keeps the public head."""
    threat = get_threat("curious_server")
    trained = train_split(CFG, SplitSpec(1, 1), base)
    runs = {}
    for steps in (0, 5):
        attack = make_attack("bisr", threat, {"widen_rounds": 1, "calibrate_below": 2.0, "calibrate_early": steps})
        runs[steps] = attack_trained(trained, threat, attack, CFG)
    for steps, result in runs.items():
        extra = result.reconstruction.extra
        assert extra["view"] != "gradient only", extra["view"]  # the forward search ran
        assert ("early_calibration" in extra["seconds_by_phase"]) == (steps > 0), (steps, extra["seconds_by_phase"])
        assert result.metrics.token_accuracy > 0.5, (steps, result.metrics)


def test_the_calibration_bar_reads_the_outputs_match_not_the_fused_score():
    """bisr's search scores each token by its outputs' match plus the gradient's bonus (<= 0); whether to
    calibrate, and the reported mean score, compare the match alone: a perfect match with a negative bonus
    is not "poor"."""
    from attacks.toolkit.prefix.invert import _forward_mean

    ids = torch.tensor([[1, 2, 0]])
    real = torch.tensor([[True, True, False]])
    bonus = torch.zeros(1, 3, 4)
    bonus[0, 0, 1], bonus[0, 1, 2], bonus[0, 2, 0] = -0.5, -0.25, -9.0
    match = torch.tensor([[1.0, 0.98, 0.1]])
    fused = match + bonus.gather(2, ids.unsqueeze(-1)).squeeze(-1)
    assert _forward_mean(fused, ids, bonus, real) == pytest.approx(0.99)
    assert _forward_mean(match, ids, None, real) == pytest.approx(0.99)
    assert _forward_mean(match, ids, None, torch.zeros_like(real)) is None


def test_search_attacks_copy_the_base_model_once(base, monkeypatch):
    """Every helper of prefix_inversion and bisr reads the public model; one frozen copy per reconstruction
    serves them all (bisr took five ~0.5 GB copies of SmolLM2), and the attack still works."""
    from suite.experiment import cell

    threat = get_threat("curious_server")
    trained = train_split(CFG, SplitSpec(1, 1), base)
    copies = []
    real = cell._observations

    def counting(*args, **kwargs):
        obs = real(*args, **kwargs)
        make = obs.base_model
        return dataclasses.replace(obs, base_model=lambda: copies.append(1) or make())

    monkeypatch.setattr(cell, "_observations", counting)
    for name in ("prefix_inversion", "bisr"):
        copies.clear()
        result = attack_trained(trained, threat, make_attack(name, threat, {"widen_rounds": 1}), CFG)
        assert len(copies) == 1, (name, len(copies))
        assert result.metrics.token_accuracy > 0.5, (name, result.metrics)


@pytest.mark.parametrize("threat_name, heads_over_shadow", [("curious_server", 1), ("colluding_client", 2)])
def test_the_reference_heads_shadow_outputs_are_computed_once(base, monkeypatch, threat_name, heads_over_shadow):
    """The score's statistics and the linear proposer's training pairs both read the reference head's outputs
    on the shadow text (the public head, or the colluder's when granted): one pass serves both. A colluder
    adds its own head's pass (the public head's pairs are still needed)."""
    import attacks.toolkit.linear
    import attacks.toolkit.prefix.invert

    threat = get_threat(threat_name)
    trained = train_split(CFG, SplitSpec(1, 1), base)
    rows = []
    for module in (attacks.toolkit.linear, attacks.toolkit.prefix.invert):
        def counting(head, ids, mask, *args, real=module.run_head, **kwargs):
            rows.append(ids.shape[0])
            return real(head, ids, mask, *args, **kwargs)

        monkeypatch.setattr(module, "run_head", counting)
    result = attack_trained(trained, threat, make_attack("prefix_inversion", threat, {"widen_rounds": 1}), CFG)
    assert rows.count(len(trained.shadow)) == heads_over_shadow, rows
    assert result.metrics.token_accuracy > 0.5, result.metrics


def test_calibration_follows_a_fine_tuned_head_the_public_one_misses():
    """The victims' head drifted from the public weights (a LoRA update the attacker never sees). The first
    pass on the public head gets some tokens wrong; ``calibrate`` fits a drift estimate to the victims' own
    traffic and the second pass recovers more, and its outputs match the observed ones more closely."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from attacks.toolkit.prefix.calibrate import calibrate

    loaded = tiny_model("llama", num_layers=4)
    head = split_model(loaded.model, SplitSpec(2, 1)).client_head.eval().requires_grad_(False)
    victim = copy.deepcopy(head)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), victim)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in victim.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(0, loaded.model.config.vocab_size, (8, 12), generator=gen)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        target = victim(ids, mask, position_ids_for(mask))
        public = head(ids, mask, position_ids_for(mask))
    scorer = Scorer.fit(public, mask)
    options = PrefixOptions(candidates=4, widen=16, widen_rounds=2, widen_below=0.9999)
    prop = torch.randint(0, loaded.model.config.vocab_size, (8, 12, 4), generator=gen)
    prop[..., 0] = ids  # the proposer holds the truth; which candidate matches is the verifier's call
    first, scores = PrefixSearch(head, loaded.model.config, scorer, options).run(target, mask, prop)
    tuned = calibrate(head, loaded.model.config, first, mask, target, scores, scorer, steps=60)
    second, _ = PrefixSearch(tuned, loaded.model.config, scorer, options).run(target, mask, prop)
    acc1, acc2 = float((first == ids).float().mean()), float((second == ids).float().mean())
    with torch.no_grad():
        fit_before = float(scorer.score(target, public).mean())
        fit_after = float(scorer.score(target, tuned(ids, mask, position_ids_for(mask))).mean())
    assert acc1 < 0.95, acc1  # the drift is large enough to mislead the public head
    assert acc2 > acc1 + 0.05 and fit_after > fit_before, (acc1, acc2, fit_before, fit_after)


def test_a_drift_fitted_on_later_positions_carries_to_the_early_ones():
    """``calibrate_early``'s premise: the drift is in the weights, not in the positions, so a drift estimate
    fitted only on the later positions (``fit``) matches the victims' outputs at the early positions, which
    it never saw, better than the public head does; with no position to fit it changes nothing."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from attacks.toolkit.prefix.calibrate import calibrate

    loaded = tiny_model("llama", num_layers=4)
    head = split_model(loaded.model, SplitSpec(2, 1)).client_head.eval().requires_grad_(False)
    victim = copy.deepcopy(head)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), victim)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in victim.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(0, loaded.model.config.vocab_size, (8, 12), generator=gen)
    mask = torch.ones_like(ids)
    pos = position_ids_for(mask)
    with torch.no_grad():
        target, public = victim(ids, mask, pos), head(ids, mask, pos)
    scorer = Scorer.fit(public, mask)
    scores = scorer.score_positions(target, public)
    later = torch.zeros_like(mask, dtype=torch.bool)
    later[:, 4:] = True
    tuned = calibrate(head, loaded.model.config, ids, mask, target, scores, scorer, steps=30, lr=2.5e-3, fit=later)
    with torch.no_grad():
        early_before = float(scorer.score_positions(target, public)[:, :4].mean())
        early_after = float(scorer.score_positions(target, tuned(ids, mask, pos))[:, :4].mean())
    assert early_after > early_before + 0.01, (early_before, early_after)
    nothing = torch.zeros_like(later)
    assert calibrate(head, loaded.model.config, ids, mask, target, scores, scorer, steps=30, fit=nothing) is head


def test_bisr_fuses_only_where_the_simulation_shows_a_real_gain():
    """The fusion weight replaces the better single view only on a paired gain: a one-token edge or an edge
    bought with as many losses is noise; a small gain on tokens the single view gets wrong, with no losses,
    is real even where the two accuracies' intervals overlap."""
    from attacks.bisr import LAMBDAS, choose_lambda, paired_gain_p

    def hits(wrong=()):  # 400 shadow tokens, these indices wrong
        c = torch.ones(400, dtype=torch.bool)
        c[list(wrong)] = False
        return c

    base = set(range(80))  # 0.80 right
    flat = {lam: hits(base) for lam in LAMBDAS}
    assert choose_lambda({**flat, 1.0: hits(base - {0})}) == LAMBDAS[0]  # one token: a tie
    swap = (base - set(range(10))) | set(range(100, 110))  # 10 gained, 10 lost elsewhere
    assert choose_lambda({**flat, 0.3: hits(swap)}) == LAMBDAS[0]
    assert choose_lambda({**flat, 0.3: hits(base - set(range(8)))}) == 0.3  # 8 gained, none lost: p = 1/256
    assert choose_lambda({**flat, LAMBDAS[-1]: hits(set(range(60))),
                          1.0: hits(set(range(59)))}) == LAMBDAS[-1]  # gradient only; fusion adds 1
    assert paired_gain_p(0, 0) == 1.0 and abs(paired_gain_p(3, 0) - 0.125) < 1e-12
    assert abs(paired_gain_p(2, 2) - 11 / 16) < 1e-12


def _tiny_capture(family: str, seed: int, shape: tuple[int, int], short: tuple[int, int] | None = None):
    """A frozen k = 2 head of a tiny model, random true ids of ``shape`` (row ``short[0]`` padded from
    ``short[1]``), its outputs and a scorer fitted on them; also the generator and the vocabulary size."""
    loaded = tiny_model(family, num_layers=4)
    head = split_model(loaded.model, SplitSpec(2, 1)).client_head.eval()
    head.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.config.vocab_size
    truth = torch.randint(0, vocab, shape, generator=gen)
    mask = torch.ones_like(truth)
    if short is not None:
        mask[short[0], short[1]:] = 0
    with torch.no_grad():
        target = head(truth, mask, position_ids_for(mask))
    return head, truth, mask, target, Scorer.fit(target, mask), gen, vocab


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_near_ties_are_re_decided_by_the_outputs_after_them(family):
    """A wrong token that matched its own position slightly better than the truth (an inflection near-tie) is
    replaced by the runner-up the later outputs agree with; right tokens stay right even where a wrong
    runner-up came close; and outside the margin nothing is re-decided (the control)."""
    from attacks.toolkit.prefix.refine import refine_ties

    head, truth, mask, target, scorer, gen, vocab = _tiny_capture(family, 5, (3, 10), short=(2, 8))
    decoys = torch.randint(0, vocab, truth.shape, generator=gen)
    decoys[decoys == truth] = (decoys[decoys == truth] + 1) % vocab
    got = truth.clone()
    wrong = [(0, 3), (1, 6), (2, 7)]
    alt_ids = torch.stack([truth, decoys], -1)  # runner-ups: the truth and a decoy at every position
    alt_s = torch.stack([torch.full(truth.shape, 0.90), torch.full(truth.shape, 0.88)], -1)
    for n, t in wrong:  # the search chose the decoy there: it scored 0.90, the truth 0.85
        got[n, t] = decoys[n, t]
        alt_ids[n, t] = torch.stack([decoys[n, t], truth[n, t]])
        alt_s[n, t] = torch.tensor([0.90, 0.85])
    fixed, changed = refine_ties(head, scorer, target, mask, got, (alt_ids, alt_s), margin=0.1)
    real = mask.bool()
    assert torch.equal(fixed[real], truth[real]) and changed == len(wrong)
    same, changed = refine_ties(head, scorer, target, mask, got, (alt_ids, alt_s), margin=0.01)
    assert torch.equal(same, got) and changed == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_early_token_is_re_decided_by_the_outputs_after_it(family):
    """A wrong token at an early position (where a deep head's own output says little about it) is found
    again among whole-vocabulary candidates ranked by the gradient of the outputs after it, and re-decided by
    them; a right token is kept against 64 random decoys."""
    from attacks.toolkit.prefix.refine import first_candidates, refine_first

    head, truth, mask, target, scorer, gen, vocab = _tiny_capture(family, 8, (6, 12))
    t = 2
    got = truth.clone()
    got[:, t] = (truth[:, t] + torch.randint(1, vocab, (6,), generator=gen)) % vocab
    cand = first_candidates(head, scorer, target, mask, got, 64, t=t)
    assert (cand == truth[:, t, None]).any(1).all()  # the truth is among the 64 of 512
    fixed, changed = refine_first(head, scorer, target, mask, got, cand, t=t)
    assert torch.equal(fixed, truth) and changed == 6
    decoys = torch.randint(0, vocab, (6, 64), generator=gen)
    decoys[decoys == truth[:, t, None]] = (truth[:, t].repeat_interleave(64).view(6, 64)[decoys == truth[:, t, None]]
                                           + 1) % vocab
    kept, changed = refine_first(head, scorer, target, mask, truth, decoys, t=t)  # right tokens stay right
    assert torch.equal(kept, truth) and changed == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("t", [1, 4])
def test_window_scores_with_a_cached_prefix_equal_the_full_forward(family, t):
    """The early-position and near-tie re-decisions run each row's recovered prefix through the head once and
    only the window per candidate: the scores are the full forward's, padding inside the window included."""
    from attacks.toolkit.prefix.refine import window_totals

    head, truth, mask, target, scorer, gen, vocab = _tiny_capture(family, 5, (3, 10), short=(1, 7))
    cand = torch.randint(0, vocab, (3, 6), generator=gen)
    cand[:, 0] = truth[:, t]
    args = (head, scorer, target, mask, truth, cand, t)
    cached, full = window_totals(*args, chunk=5), window_totals(*args, cached=False)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    assert bool((cached.argmax(1) == 0).all())  # and the truth wins its window (an un-fine-tuned head)


class _Tok:
    """A stand-in tokenizer: ``prefix`` special ids before every text, then one id per character."""

    def __init__(self, prefix):
        self.prefix, self.all_special_ids = list(prefix), [2, 3]

    def __call__(self, text):
        return {"input_ids": self.prefix + [10 + ord(c) % 50 for c in text]}


def test_known_prefix_is_the_special_tokens_every_text_starts_with():
    from attacks.toolkit.observe import known_prefix

    assert known_prefix(_Tok([2])) == (2,)  # Gemma's <bos>
    assert known_prefix(_Tok([])) == ()  # SmolLM2: nothing
    assert known_prefix(_Tok([2, 3])) == (2, 3)


def test_the_search_takes_a_known_first_token_it_could_not_have_found():
    """Position 0 is a token the tokenizer always puts first: the search keeps it (no proposal holds it, no
    widening runs there) and finds the rest exactly after it; searched, a wrong first token costs later ones."""
    loaded = tiny_model("llama", num_layers=4)
    head = split_model(loaded.model, SplitSpec(2, 1)).client_head.eval()
    head.requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(3, vocab, (4, 8), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    with torch.no_grad():
        target = head(ids, mask, position_ids_for(mask))
    scorer = Scorer.fit(target, mask)
    prop = ids[:, :, None].clone()  # the truth everywhere ...
    prop[:, 0] = 2  # ... but at position 0
    options = PrefixOptions(candidates=1, widen=0)
    got, _ = PrefixSearch(head, loaded.model.config, scorer, options).run(target, mask, prop, known=(1,))
    assert torch.equal(got, ids)
    blind, _ = PrefixSearch(head, loaded.model.config, scorer, options).run(target, mask, prop)
    assert (blind[:, 0] == 2).all()  # without it, the only candidate there is wrong


def test_linear_inverter_self_training_moves_it_to_the_victims_pairs():
    """``LinearInverter.add``: pairs from the victims' own traffic join the fit. Fitted on a shadow head's outputs
    (a linear map of the token rows), it reads a drifted head's outputs (another map) badly; with the victims'
    recovered pairs added it reads them."""
    import torch.nn.functional as F

    from attacks.toolkit.linear import LinearInverter

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(40, 8, generator=gen)
    rows = F.normalize(table, dim=-1)
    shadow_map, drifted_map = torch.randn(8, 12, generator=gen), torch.randn(8, 12, generator=gen)
    ids = torch.randint(0, 40, (64, 4), generator=gen)
    prop = LinearInverter(rows[ids] @ shadow_map, ids, torch.ones_like(ids), table, k=3)
    truth = torch.randint(0, 40, (200,), generator=gen)
    pos = torch.randint(0, 4, (200,), generator=gen)
    victims = rows[truth] @ drifted_map
    before = (prop.similarities(victims, pos).argmax(-1) == truth).float().mean()
    prop.add(victims[:100], pos[:100], truth[:100], weight=8.0)  # the pairs recovered so far
    after = (prop.similarities(victims[100:], pos[100:]).argmax(-1) == truth[100:]).float().mean()  # the rest
    assert prop.added == 100
    assert before < 0.3 and after > 0.9, (before, after)
    assert prop(rows[ids[:2]] @ shadow_map).shape == (2, 4, 3)
