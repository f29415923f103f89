"""Bootstrap intervals: they reproduce the metrics on the full sample, cover the true mean of a known
distribution about 95 % of the time, and pair an advantage over a baseline on the same records."""

import numpy as np
import pytest

from suite.scoring.intervals import interval, point, record_stats, summarize
from suite.scoring.metrics import leakage_metrics


def test_record_statistics_reproduce_every_metric():
    rng = np.random.default_rng(0)
    words = "the a cat dog John Smith 555-0100 runs fast , .".split()
    for trial in range(20):
        n = int(rng.integers(1, 10))
        refs = [" ".join(rng.choice(words, int(rng.integers(1, 10)))) for _ in range(n)]
        hyps = [r if rng.random() < 0.3 else " ".join(rng.choice(words, int(rng.integers(0, 10)))) for r in refs]
        if trial % 5 == 0:
            hyps = list(refs)  # the perfect-corpus special case of BLEU
        true = rng.integers(0, 5, (n, 8))
        pred = np.where(rng.random((n, 8)) < 0.5, true, 0)
        mask = np.ones((n, 8))
        mask[:, 6:] = 0
        pii = [{"name": "John Smith", "phone": "555-0100"}] * n
        expect = leakage_metrics(references=refs, hypotheses=hyps, true_ids=true, pred_ids=pred, mask=mask,
                                 pii=pii).as_dict()
        stats = record_stats(references=refs, hypotheses=hyps, true_ids=true, pred_ids=pred, mask=mask, pii=pii)
        for metric, value in expect.items():
            got = point(metric, [stats[metric]])
            assert (got is None and value is None) or got == pytest.approx(value, abs=1e-9), (metric, refs, hyps)


@pytest.mark.parametrize("seeds", [1, 3])
def test_interval_covers_the_true_mean_about_95_percent(seeds):
    """400 repetitions of a skewed known distribution (exponential, mean 2) scored as a ratio metric: the
    percentile interval over records (x seeds) holds the true mean in [92 %, 98 %] of them."""
    rng = np.random.default_rng(1)
    hits, reps = 0, 400
    for rep in range(reps):
        per_seed = [np.stack([rng.exponential(2.0, 60), np.ones(60)], 1) for _ in range(seeds)]
        lo, hi = interval("rouge1", per_seed, n_boot=1000, seed=rep)
        hits += lo <= 2.0 <= hi
    assert 0.92 <= hits / reps <= 0.98, hits / reps


def test_interval_is_a_real_interval_and_narrows_with_more_records():
    rng = np.random.default_rng(2)
    small = [np.stack([rng.random(20) < 0.4, np.ones(20)], 1).astype(float)]
    large = [np.stack([rng.random(2000) < 0.4, np.ones(2000)], 1).astype(float)]
    lo_s, hi_s = interval("exact_match", small)
    lo_l, hi_l = interval("exact_match", large)
    assert lo_s < point("exact_match", small) < hi_s
    assert lo_l < 0.4 < hi_l and (hi_l - lo_l) < (hi_s - lo_s) / 5


def test_paired_advantage_over_a_baseline():
    rng = np.random.default_rng(3)
    base = rng.random(50) < 0.3
    better = base | (rng.random(50) < 0.5)  # the attack gets what blind gets, and more
    cell = [np.stack([better, np.ones(50)], 1).astype(float)]
    blind = [np.stack([base, np.ones(50)], 1).astype(float)]
    out = summarize([{"exact_match": cell[0]}], [{"exact_match": blind[0]}])
    assert out["adv_exact_match"] == pytest.approx(better.mean() - base.mean())
    assert 0 < out["adv_exact_match_lo"] <= out["adv_exact_match"] <= out["adv_exact_match_hi"]
    same = summarize([{"exact_match": cell[0]}], [{"exact_match": cell[0]}])
    assert same["adv_exact_match"] == same["adv_exact_match_lo"] == same["adv_exact_match_hi"] == 0
    with pytest.raises(ValueError, match="same records"):
        interval("exact_match", cell, baseline=[blind[0][:10]])
