"""Per-record scores and percentile-bootstrap intervals for every leakage metric and utility.

Every metric of ``suite.scoring.metrics`` is a function of *sums over records* of a small per-record statistic
vector, so a resample of records (and of seeds) only has to add rows up again:

* token accuracy: (correct tokens, real tokens) -> ratio of sums (as ``token_accuracy``);
* exact match: (exact, has tokens) -> ratio of sums;
* PII recovery: (recovered fields, fields sent) -> ratio of sums (micro average), None without fields;
* ROUGE-1/2/L: (F1 x 100, 1) -> mean;
* BLEU-4: nltk's clipped n-gram numerators and denominators (n = 1..4), hypothesis and reference length,
  whether the pair differs and whether the hypothesis is non-empty -> *corpus* BLEU recomputed from the
  summed counts on each resample (``corpus_bleu``'s own arithmetic, smoothing ``method1``), with
  ``suite.scoring.metrics.bleu4``'s perfect-corpus special case.

Statistics are arrays ``[S, N, D]`` (seeds x records x statistic). The bootstrap resamples seeds with
replacement and, within each drawn seed, records with replacement (records x seeds; with one seed it is
the plain record bootstrap), and reports the 2.5 / 97.5 percentiles of the recomputed metric. An
advantage over a baseline on the *same* records is bootstrapped paired: the same indices for both.
Vectorised with numpy: 2,000 resamples of a few hundred records take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from nltk.translate.bleu_score import modified_precision
from rouge_score.rouge_scorer import RougeScorer

from suite.scoring.metrics import ROUGE_TYPES, _ids_and_mask, _tokenize, pii_hits

N_BOOT = 2000
LEVEL = 0.95
_EPSILON = 0.1  # nltk SmoothingFunction().method1's epsilon


def record_stats(*, references: Sequence[str], hypotheses: Sequence[str], true_ids: Any, pred_ids: Any,
                 mask: Any, pii: Sequence[Mapping[str, str]] | None = None) -> dict[str, np.ndarray]:
    """Per-record statistics ``{metric: [N, D]}`` whose sums give each metric of ``leakage_metrics``."""
    true, pred, real = _ids_and_mask(true_ids, pred_ids, mask)
    if len(references) != len(hypotheses) or len(references) != len(true):
        raise ValueError(f"{len(references)} references, {len(hypotheses)} hypotheses and {len(true)} id rows; "
                         "they must pair up")
    out: dict[str, np.ndarray] = {
        "token_accuracy": np.stack([((true == pred) & real).sum(1), real.sum(1)], 1).astype(float),
        "exact_match": np.stack([((true == pred) | ~real).all(1) & real.any(1), real.any(1)], 1).astype(float),
    }
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rouge = np.array([[100.0 * s[t].fmeasure for t in ROUGE_TYPES]
                      for s in (scorer.score(r, h) for r, h in zip(references, hypotheses, strict=True))])
    for i, t in enumerate(ROUGE_TYPES):
        out[t] = np.stack([rouge[:, i], np.ones(len(references))], 1)
    bleu = []
    for r, h in zip(references, hypotheses, strict=True):
        ref, hyp = _tokenize(r), _tokenize(h)
        precisions = [modified_precision([ref], hyp, n) for n in range(1, 5)]
        bleu.append([*(p.numerator for p in precisions), *(p.denominator for p in precisions), len(hyp), len(ref),
                     float(ref != hyp), float(bool(hyp))])
    out["bleu4"] = np.array(bleu, dtype=float).reshape(len(references), 12)
    if pii is not None:
        rows = []
        for rec, hyp, ref in zip(pii, hypotheses, references, strict=True):
            got, sent = pii_hits(rec, hyp), pii_hits(rec, ref)
            rows.append([sum(got[f] for f in sent if sent[f]), sum(sent.values())])
        out["pii_recovery"] = np.array(rows, dtype=float).reshape(len(references), 2)
    return out


def _bleu(s: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (0-100) from summed statistics ``[..., 12]``, as ``suite.scoring.metrics.bleu4`` computes it."""
    num, den, hyp_len, ref_len = s[..., 0:4], s[..., 4:8], s[..., 8], s[..., 9]
    mismatched, nonempty = s[..., 10], s[..., 11]
    p = np.where(num == 0, _EPSILON, num) / np.maximum(den, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(hyp_len > ref_len, 1.0, np.exp(1 - ref_len / np.where(hyp_len > 0, hyp_len, 1)))
        score = np.exp(np.log(p).mean(-1)) * bp
    score = np.where((num[..., 0] == 0) | (hyp_len == 0), 0.0, score)
    return np.where((mismatched == 0) & (nonempty > 0), 100.0, 100.0 * score)


def statistic(metric: str, sums: np.ndarray) -> np.ndarray:
    """The metric from summed per-record statistics ``[..., D]`` (NaN where it is undefined)."""
    if metric == "bleu4":
        return _bleu(sums)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums[..., 1] > 0, sums[..., 0] / sums[..., 1], np.nan)


def _stack(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    arrays = [np.asarray(a, dtype=float) for a in per_seed]
    if not arrays or any(a.ndim != 2 for a in arrays):
        raise ValueError("statistics must be one [N, D] array per seed")
    n = max(len(a) for a in arrays)
    if any(len(a) != n for a in arrays):  # unequal record counts: pad with zero rows (they add nothing)
        arrays = [np.concatenate([a, np.zeros((n - len(a), a.shape[1]))]) for a in arrays]
    return np.stack(arrays)


def _indices(shape: tuple[int, int], n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s, n = shape
    seeds = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), dtype=int)
    records = rng.integers(0, n, size=(n_boot, s, n))
    return seeds, records


def _resampled_sums(stats: np.ndarray, idx: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    seeds, records = idx
    return stats[seeds[:, :, None], records].sum(axis=(1, 2))  # [B, D]


def _percentiles(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def point(metric: str, per_seed: Sequence[np.ndarray]) -> float | None:
    """The metric over all records of all seeds (pooled sums)."""
    v = float(statistic(metric, _stack(per_seed).sum(axis=(0, 1))))
    return None if math.isnan(v) else v


def interval(metric: str, per_seed: Sequence[np.ndarray], *, baseline: Sequence[np.ndarray] | None = None,
             n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``metric`` over records x seeds; with ``baseline`` (statistics of
    another reconstruction of the same records, same order), the interval of the difference, paired."""
    stats = _stack(per_seed)
    idx = _indices(stats.shape[:2], n_boot, seed)
    values = statistic(metric, _resampled_sums(stats, idx))
    if baseline is not None:
        base = _stack(baseline)
        if base.shape[:2] != stats.shape[:2]:
            raise ValueError(f"the baseline scores {base.shape[:2]} seeds x records, the cell {stats.shape[:2]}: "
                             "an advantage needs the same records")
        values = values - statistic(metric, _resampled_sums(base, idx))
    return _percentiles(values, level)


def summarize(per_seed: Sequence[Mapping[str, np.ndarray]], blind: Sequence[Mapping[str, np.ndarray]] | None = None,
              *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float | None]:
    """Store columns from per-record statistics of one cell (one mapping per seed): every metric's point
    value, ``<metric>_lo/_hi``, and with ``blind`` (the blind baseline on the same records)
    ``adv_<metric>`` and ``adv_<metric>_lo/_hi``."""
    out: dict[str, float | None] = {}
    for metric in per_seed[0]:
        mine = [s[metric] for s in per_seed]
        out[metric] = point(metric, mine)
        out[f"{metric}_lo"], out[f"{metric}_hi"] = interval(metric, mine, n_boot=n_boot, seed=seed)
        if blind is not None and all(metric in b for b in blind):
            theirs = [b[metric] for b in blind]
            base = point(metric, theirs)
            out[f"adv_{metric}"] = None if out[metric] is None or base is None else out[metric] - base
            out[f"adv_{metric}_lo"], out[f"adv_{metric}_hi"] = interval(metric, mine, baseline=theirs,
                                                                        n_boot=n_boot, seed=seed)
    return out


def utility_summary(per_seed: Sequence[np.ndarray], *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, float | None]:
    """``utility`` (token-weighted mean held-out loss) and ``utility_lo/_hi`` from per-sequence
    (loss sum, tokens) rows, one ``[M, 2]`` array per seed."""
    return {"utility": point("utility", per_seed),
            **dict(zip(("utility_lo", "utility_hi"), interval("utility", per_seed, n_boot=n_boot, seed=seed),
                       strict=True))}


def to_json(stats: Mapping[str, np.ndarray]) -> dict[str, list[list[float]]]:
    return {k: np.asarray(v, dtype=float).tolist() for k, v in stats.items()}


def from_json(data: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float).reshape(len(v), -1) for k, v in data.items()}
