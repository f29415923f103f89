"""Leakage metrics: how much of the client's private text a reconstruction recovers.

Text metrics (BLEU-4, ROUGE) take detokenised strings and report on a 0-100 scale; id metrics (token
accuracy, exact match) take ``[N, T]`` token-id arrays plus an attention mask and report on 0-1; PII
recovery takes each record's PII fields and reports the fraction found verbatim in its reconstruction.

Every function raises ``ValueError`` on an empty corpus or on inputs whose lengths/shapes disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from nltk.tokenize import TreebankWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from rouge_score.rouge_scorer import RougeScorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_tokenize = TreebankWordTokenizer().tokenize
_smoothing = SmoothingFunction().method1


@dataclass(frozen=True)
class LeakageMetrics:
    bleu4: float  # 0-100, corpus BLEU-4
    rouge1: float  # 0-100, mean F1
    rouge2: float  # 0-100, mean F1
    rougeL: float  # 0-100, mean F1
    token_accuracy: float  # 0-1, over real (non-padding) tokens
    exact_match: float  # 0-1, over sequences with at least one real token
    pii_recovery: float | None  # 0-1; None when the corpus carries no PII fields

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def _check_texts(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise ValueError("references and hypotheses must be sequences of strings, not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses; they must pair up")
    if not references:
        raise ValueError("no references/hypotheses to score")


def bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 (nltk ``corpus_bleu``, one reference per hypothesis) on a 0-100 scale.

    Text is tokenised with nltk's ``TreebankWordTokenizer`` (no downloaded data needed) and case is
    kept, so a reconstruction that gets a name's capitalisation wrong is penalised. Smoothing is
    ``SmoothingFunction().method1``: it adds a small epsilon to zero n-gram match counts, so short or
    poor reconstructions score near 0 instead of exactly 0 with a warning (BLEU is a geometric mean, so
    one empty n-gram order would otherwise zero the whole score). An empty hypothesis scores 0; a corpus
    of empty hypotheses scores exactly 0.

    A reconstruction identical to its references (token for token, at least one token) scores exactly
    100. This is a deliberate special case: plain BLEU-4 needs 4-grams, and with method1 smoothing a
    perfect corpus whose sentences are all shorter than four tokens would otherwise score well below
    100 (e.g. "the cat" vs itself gives 31.6), understating a complete leak. Any imperfect corpus gets
    nltk's value unchanged.
    """
    _check_texts(references, hypotheses)
    refs = [_tokenize(r) for r in references]
    hyps = [_tokenize(h) for h in hypotheses]
    if refs == hyps and any(hyps):
        return 100.0
    return 100.0 * float(corpus_bleu([[r] for r in refs], hyps, smoothing_function=_smoothing))


def rouge(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over the pairs, 0-100 (rouge-score, ``use_stemmer=True``).

    rouge-score's own tokenizer lowercases and drops non-alphanumerics, so ROUGE, unlike BLEU,
    ignores case and punctuation. An empty hypothesis scores 0 for its pair.
    """
    _check_texts(references, hypotheses)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for ref, hyp in zip(references, hypotheses, strict=True):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(references) for key, total in totals.items()}


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    return np.asarray(x)


def _ids_and_mask(true_ids: Any, pred_ids: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    true, pred, real = _to_numpy(true_ids), _to_numpy(pred_ids), _to_numpy(mask)
    if not (true.shape == pred.shape == real.shape) or true.ndim != 2:
        raise ValueError(
            f"true_ids, pred_ids and mask must all have the same [N, T] shape; got "
            f"{true.shape}, {pred.shape} and {real.shape}"
        )
    return true, pred, real != 0


def token_accuracy(true_ids: Any, pred_ids: Any, mask: Any) -> float:
    """Fraction of real tokens (mask 1; padding is 0) whose predicted id equals the true id, 0-1."""
    true, pred, real = _ids_and_mask(true_ids, pred_ids, mask)
    n_real = int(real.sum())
    if n_real == 0:
        raise ValueError("mask marks no real tokens; token accuracy is undefined")
    return float(((true == pred) & real).sum() / n_real)


def exact_match(true_ids: Any, pred_ids: Any, mask: Any) -> float:
    """Fraction of sequences whose real tokens are all reconstructed exactly, 0-1.

    Padding positions are ignored; sequences with no real tokens are left out of the count.
    """
    true, pred, real = _ids_and_mask(true_ids, pred_ids, mask)
    has_tokens = real.any(axis=1)
    if not has_tokens.any():
        raise ValueError("mask marks no real tokens in any sequence; exact match is undefined")
    exact = ((true == pred) | ~real).all(axis=1)
    return float(exact[has_tokens].mean())


def _pii_value(value: Any) -> str | None:
    """A field's value as text, or None when it is missing/empty (then it is not PII to recover)."""
    if value is None:
        return None
    text = str(value)
    return text or None


def pii_hits(pii: Mapping[str, str], hypothesis: str) -> dict[str, bool]:
    """For one record, which PII fields appear verbatim (case-sensitive substring) in its reconstruction.

    Matching is deliberately strict: "john smith" does not recover "John Smith" and "5550100" does not
    recover "555-0100", since a report should only claim what the attacker actually holds verbatim.
    Fields whose value is empty or None are not PII and are left out; other values are compared as
    ``str(value)``.
    """
    values = {field: _pii_value(value) for field, value in pii.items()}
    return {field: value in hypothesis for field, value in values.items() if value is not None}


def pii_recovery(
    pii: Sequence[Mapping[str, str]],
    hypotheses: Sequence[str],
    *,
    references: Sequence[str] | None = None,
) -> float | None:
    """Recovered PII fields / all PII fields over the corpus (micro average), 0-1; None if no fields.

    ``pii[i]`` maps field name to value for record ``i``; a field counts as recovered when its value is
    a case-sensitive substring of ``hypotheses[i]`` (see ``pii_hits``). Micro averaging weights every
    field equally, so records with many fields count for more than records with one.

    With ``references`` (the text the client actually sent, e.g. decoded after truncation to the
    sequence length), fields whose value does not appear verbatim in ``references[i]`` are left out of
    both counts: an attacker cannot recover what was cut off before it left the client, and counting
    it would make even a perfect reconstruction score below 1.
    """
    if isinstance(hypotheses, str):
        raise ValueError("hypotheses must be a sequence of strings, not a single string")
    if len(pii) != len(hypotheses):
        raise ValueError(f"{len(pii)} PII records but {len(hypotheses)} hypotheses; they must pair up")
    if references is not None:
        if isinstance(references, str):
            raise ValueError("references must be a sequence of strings, not a single string")
        if len(references) != len(pii):
            raise ValueError(f"{len(pii)} PII records but {len(references)} references; they must pair up")
    hits: list[bool] = []
    for i, (record, hyp) in enumerate(zip(pii, hypotheses, strict=True)):
        record_hits = pii_hits(record, hyp)
        if references is not None:
            sent = pii_hits(record, references[i])
            record_hits = {field: hit for field, hit in record_hits.items() if sent[field]}
        hits.extend(record_hits.values())
    return sum(hits) / len(hits) if hits else None


def leakage_metrics(
    *,
    references: Sequence[str],
    hypotheses: Sequence[str],
    true_ids: Any,
    pred_ids: Any,
    mask: Any,
    pii: Sequence[Mapping[str, str]] | None = None,
) -> LeakageMetrics:
    """All leakage metrics for one reconstructed corpus; ``pii=None`` means no PII (recovery None).

    PII recovery only counts fields present verbatim in ``references`` (see ``pii_recovery``), so PII
    truncated away before the client sent its text neither helps nor hurts the attack's score.
    """
    n_ids = len(_to_numpy(true_ids))
    if n_ids != len(references):
        raise ValueError(f"{len(references)} references but {n_ids} id sequences; they must pair up")
    scores = rouge(references, hypotheses)
    return LeakageMetrics(
        bleu4=bleu4(references, hypotheses),
        rouge1=scores["rouge1"],
        rouge2=scores["rouge2"],
        rougeL=scores["rougeL"],
        token_accuracy=token_accuracy(true_ids, pred_ids, mask),
        exact_match=exact_match(true_ids, pred_ids, mask),
        pii_recovery=None if pii is None else pii_recovery(pii, hypotheses, references=references),
    )
