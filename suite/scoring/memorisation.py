"""Scores of what a model remembers: canary exposure (Carlini et al.'s secret sharer) and membership inference
(ROC AUC and the true-positive rate at low false-positive rates), each with a percentile-bootstrap interval.

* Exposure of a canary whose secret was drawn from a space of ``|R|`` candidates is
  ``log2 |R| - log2 rank``, where rank is the canary's place among every candidate ordered by the model's
  log-perplexity. Ranking the whole space is out of reach for realistic spaces, so (Carlini et al. 2019,
  §4.3) the log-perplexities of >= 10^4 candidates sampled from the space are fitted with a skew-normal
  distribution, and exposure is ``-log2 CDF(canary)``: the fraction of the space expected to be more likely
  than the canary, in bits. It is capped at ``log2 |R|`` (the canary first of the whole space).
* Membership: higher scores mean "member". AUC is the Mann-Whitney statistic (ties count one half). TPR at
  FPR = a is the fraction of members scoring above the threshold that at most ``floor(a * non-members)``
  non-members exceed: with fewer than 1 / a non-members it rests on no false positive at all, which
  ``false_positives_at`` says.

Intervals resample records with replacement (members and non-members separately, stratified), as
``suite.scoring.intervals`` does for the leakage metrics: 2.5 / 97.5 percentiles of ``N_BOOT`` resamples.
A bootstrap of a rate whose every draw is 0 (no canary extracted, no member above the threshold) is [0, 0],
which would read as "none" however few the trials: rates (TPR, the share extracted) therefore also get the
exact binomial (Clopper-Pearson) interval of their count, and the wider of the two ends is reported.
No torch: the reports read these functions too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from suite.scoring.intervals import LEVEL, N_BOOT, _percentiles

FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}


def exposure(canary: float, candidates: Sequence[float], space_bits: float) -> float:
    """Exposure (bits) of a canary with log-perplexity ``canary`` (lower = more likely) given the
    log-perplexities of candidates sampled uniformly from the secret space (``space_bits = log2 |R|``)."""
    from scipy.stats import skewnorm

    values = np.asarray(candidates, dtype=float)
    if values.size < 2 or not np.all(np.isfinite(values)) or not math.isfinite(canary):
        raise ValueError("exposure needs finite log-perplexities of at least two candidates and the canary")
    if np.ptp(values) == 0:  # every candidate alike: the canary is likelier than all, as likely, or less
        if canary > values[0]:
            return 0.0  # less likely than every candidate: nothing exposed
        return 1.0 if canary == values[0] else float(space_bits)
    a, loc, scale = skewnorm.fit(values)
    log_cdf = float(skewnorm.logcdf(canary, a, loc, scale))
    return float(min(space_bits, max(0.0, -log_cdf / math.log(2))))


def exposure_by_rank(canary: float, candidates: Sequence[float], space_bits: float) -> float:
    """The rank estimate without a fit: ``-log2`` of the fraction of candidates at least as likely as the
    canary (one half candidate when none is, so it stays finite). A check of the fit, not the reported value."""
    values = np.asarray(candidates, dtype=float)
    below = float(np.sum(values <= canary))
    return float(min(space_bits, -math.log2(max(below, 0.5) / values.size)))


def _auc(member: np.ndarray, non: np.ndarray) -> np.ndarray:
    """AUC along the last axis of ``member`` [..., M] against ``non`` [..., N] (Mann-Whitney, ties 1/2)."""
    both = np.concatenate([member, non], axis=-1)
    ranks = _rank(both)
    m, n = member.shape[-1], non.shape[-1]
    return (ranks[..., :m].sum(-1) - m * (m + 1) / 2) / (m * n)


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _tpr_at(member: np.ndarray, non: np.ndarray, fpr: float) -> np.ndarray:
    """TPR at a false-positive rate of at most ``fpr`` along the last axis: the threshold lets at most
    ``floor(fpr * N)`` non-members score strictly above it."""
    allowed = int(math.floor(fpr * non.shape[-1]))
    ordered = -np.sort(-non, axis=-1)  # descending
    threshold = ordered[..., allowed] if allowed < non.shape[-1] else np.full(non.shape[:-1], -np.inf)
    return (member > threshold[..., None]).mean(-1)


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact binomial interval of a rate with ``k`` successes in ``n`` trials."""
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def _widen(boot: tuple[float | None, float | None], exact: tuple[float, float]) -> tuple[float | None, float | None]:
    lo, hi = boot
    return (exact[0] if lo is None else min(lo, exact[0]), exact[1] if hi is None else max(hi, exact[1]))


def false_positives_at(non_members: int, fpr: float) -> int:
    """How many false positives the TPR at ``fpr`` rests on with ``non_members`` non-members."""
    return int(math.floor(fpr * non_members))


def membership_summary(member_scores: Sequence[float], non_member_scores: Sequence[float], *,
                       n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict[str, float | None]:
    """``auc``, ``tpr_at_1pct_fpr``, ``tpr_at_0_1pct_fpr``, each with ``_lo`` / ``_hi`` (stratified bootstrap),
    and how many false positives each TPR rests on (``fp_at_1pct_fpr``, ``fp_at_0_1pct_fpr``)."""
    return pooled_membership_summary([(member_scores, non_member_scores)], n_boot=n_boot, level=level, seed=seed)


def pooled_membership_summary(per_seed: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int = N_BOOT,
                              level: float = LEVEL, seed: int = 0) -> dict[str, float | None]:
    """``membership_summary`` over seeds: one (member scores, non-member scores) pair per seed, each seed's
    scores from its own trained model. A seed's scores set its own threshold (scores of two models are not on
    one scale), so each value is the mean over seeds of the seed's AUC or TPR; the interval resamples seeds
    with replacement and, within each drawn seed, members and non-members (records x seeds, stratified, as
    ``suite.scoring.intervals`` does for the leakage metrics). With one seed it is the record bootstrap. The TPR
    intervals are widened to the Clopper-Pearson interval of the pooled count; ``fp_at_*`` is per seed (the
    fewest non-members any seed has)."""
    pairs = [(np.asarray(m, dtype=float), np.asarray(n, dtype=float)) for m, n in per_seed]
    if not pairs:
        raise ValueError("membership needs at least one seed's scores")
    for member, non in pairs:
        if member.size == 0 or non.size == 0:
            raise ValueError(f"membership needs members and non-members, got {member.size} and {non.size}")
        if not (np.all(np.isfinite(member)) and np.all(np.isfinite(non))):
            raise ValueError("membership scores must be finite")
    rng = np.random.default_rng(seed)
    seeds = _seed_draws(rng, len(pairs), n_boot)
    boots = []  # per seed: (member resamples, non-member resamples), drawn in the order of the one-seed bootstrap
    for member, non in pairs:
        boots.append((member[rng.integers(0, member.size, size=(n_boot, member.size))],
                      non[rng.integers(0, non.size, size=(n_boot, non.size))]))

    def pooled(fn) -> tuple[float, np.ndarray]:
        point = float(np.mean([fn(m, n) for m, n in pairs]))
        per = np.stack([fn(mb, nb) for mb, nb in boots])  # [S, B]
        return point, per[seeds, np.arange(n_boot)[:, None]].mean(1)

    out: dict[str, float | None] = {}
    out["auc"], resampled = pooled(_auc)
    out["auc_lo"], out["auc_hi"] = _percentiles(resampled, level)
    members = sum(m.size for m, _ in pairs)
    for name, fpr in FPRS.items():
        out[name], resampled = pooled(lambda m, n, fpr=fpr: _tpr_at(m, n, fpr))
        hits = sum(round(float(_tpr_at(m, n, fpr)) * m.size) for m, n in pairs)
        out[f"{name}_lo"], out[f"{name}_hi"] = _widen(_percentiles(resampled, level),
                                                      clopper_pearson(hits, members, level))
        out["fp_at" + name.removeprefix("tpr_at")] = false_positives_at(min(n.size for _, n in pairs), fpr)
    return out


def _seed_draws(rng: np.random.Generator, seeds: int, n_boot: int) -> np.ndarray:
    """``[n_boot, seeds]`` seed indices drawn with replacement (no draw with one seed, so that its bootstrap is
    the plain record bootstrap)."""
    return rng.integers(0, seeds, size=(n_boot, seeds)) if seeds > 1 else np.zeros((n_boot, 1), dtype=int)


def roc_points(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> tuple[list[float], list[float]]:
    """(FPR, TPR) of every threshold, for a ROC curve (the report draws it on log-log axes)."""
    member = np.asarray(member_scores, dtype=float)
    non = np.asarray(non_member_scores, dtype=float)
    thresholds = np.unique(np.concatenate([member, non]))[::-1]
    fpr = [(non >= t).mean() for t in thresholds]
    tpr = [(member >= t).mean() for t in thresholds]
    return [0.0, *map(float, fpr)], [0.0, *map(float, tpr)]


def mean_summary(values: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0, binary: bool = False) -> tuple[float | None, float | None, float | None]:
    """The mean of per-canary values (exposure, extracted) and its bootstrap interval over canaries;
    ``binary`` (0/1 values, a rate): widened to the Clopper-Pearson interval of the count."""
    return pooled_mean_summary([values], n_boot=n_boot, level=level, seed=seed, binary=binary)


def pooled_mean_summary(per_seed: Sequence[Sequence[float]], *, n_boot: int = N_BOOT, level: float = LEVEL,
                        seed: int = 0, binary: bool = False) -> tuple[float | None, float | None, float | None]:
    """``mean_summary`` over seeds: the mean over canaries x seeds, its interval resampling seeds and, within
    each drawn seed, canaries (every seed has the same canaries: the config makes them)."""
    arrays = [np.asarray(v, dtype=float) for v in per_seed]
    if not arrays or any(a.size == 0 for a in arrays):
        return None, None, None
    if len({a.size for a in arrays}) > 1:
        raise ValueError(f"every seed must score the same canaries, got {[a.size for a in arrays]} values")
    v = np.stack(arrays)  # [S, N]
    rng = np.random.default_rng(seed)
    seeds = _seed_draws(rng, v.shape[0], n_boot)
    records = rng.integers(0, v.shape[1], size=(n_boot, v.shape[0], v.shape[1]))
    boots = v[seeds[:, :, None], records].mean(axis=(1, 2))
    lo, hi = _percentiles(boots, level)
    if binary:
        lo, hi = _widen((lo, hi), clopper_pearson(int(v.sum()), v.size, level))
    return float(v.mean()), lo, hi
