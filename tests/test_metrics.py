"""Leakage metrics pinned on hand-made examples."""

import math

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from suite.scoring.metrics import (
    LeakageMetrics,
    bleu4,
    exact_match,
    leakage_metrics,
    pii_hits,
    pii_recovery,
    rouge,
    token_accuracy,
)

TEXTS = ["The patient John Smith was admitted on Monday.", "Call me at 555-0100 after five."]

# 3 sequences, T=4; 10 real tokens, 7 of them right; only row 0 is exact.
TRUE = np.array([[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 10, 0]])
PRED = np.array([[1, 2, 3, 4], [5, 0, 7, 9], [0, 9, 0, 3]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])


def test_identical_text_scores_100():
    assert bleu4(TEXTS, TEXTS) == pytest.approx(100.0)
    assert rouge(TEXTS, TEXTS) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})


def test_bleu_hand_computed():
    # Unigram 5/6, bigram 3/5, trigram 2/4, 4-gram 1/3, no brevity penalty: BLEU = (1/12) ** (1/4).
    ref, hyp = "the cat sat on the mat", "the cat sat on a mat"
    score = bleu4([ref], [hyp])
    assert score == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    nltk_single = sentence_bleu([ref.split()], hyp.split(), smoothing_function=SmoothingFunction().method1)
    assert score == pytest.approx(100 * nltk_single, abs=1e-6)
    assert 0 < score < 100


def test_bleu_is_case_sensitive_and_empty_hypothesis_scores_zero():
    assert bleu4(["The Cat sat on the mat"], ["the cat sat on the mat"]) < 100
    assert bleu4(TEXTS, ["", ""]) == 0.0


def test_rouge1_partial_and_stemming():
    assert rouge(["the cat sat"], ["the cat ran"])["rouge1"] == pytest.approx(200 / 3)
    assert rouge(["he was running"], ["he was run"])["rouge1"] == pytest.approx(100.0)
    assert rouge(["the cat sat"], [""])["rouge1"] == 0.0


def test_rouge_is_mean_over_pairs():
    scores = rouge(["the cat sat", "a dog"], ["the cat sat", "nothing here"])
    assert scores["rouge1"] == pytest.approx(50.0)


def test_token_accuracy_and_exact_match_hand_computed():
    assert token_accuracy(TRUE, PRED, MASK) == pytest.approx(7 / 10)
    assert exact_match(TRUE, PRED, MASK) == pytest.approx(1 / 3)


def test_identical_ids_are_perfect_and_tensors_work():
    t, m = torch.tensor(TRUE), torch.tensor(MASK)
    assert token_accuracy(t, t.clone(), m) == 1.0
    assert exact_match(t, t.clone(), m.bool()) == 1.0


def test_padding_positions_do_not_count():
    pred = TRUE.copy()
    pred[MASK == 0] = 99  # garbage only where the mask says padding
    assert token_accuracy(TRUE, pred, MASK) == 1.0
    assert exact_match(TRUE, pred, MASK) == 1.0


def test_exact_match_ignores_sequences_without_real_tokens():
    mask = MASK.copy()
    mask[2] = 0  # row 2 is all padding: left out, so 1 exact of 2
    assert exact_match(TRUE, PRED, mask) == pytest.approx(1 / 2)


def test_id_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same"):
        token_accuracy(TRUE, PRED[:, :3], MASK)
    with pytest.raises(ValueError, match="same"):
        exact_match(TRUE, PRED, MASK[:2])


def test_pii_two_of_three_fields_recovered():
    pii = [{"name": "John Smith", "phone": "555-0100"}, {"email": "jo@example.com"}]
    hyps = ["The patient John Smith called 555-0100.", "mail JO@example.com"]  # case-sensitive miss
    assert pii_hits(pii[0], hyps[0]) == {"name": True, "phone": True}
    assert pii_hits(pii[1], hyps[1]) == {"email": False}
    assert pii_recovery(pii, hyps) == pytest.approx(2 / 3)


def test_pii_none_when_no_fields():
    assert pii_recovery([{}, {}], ["a", "b"]) is None
    assert pii_recovery([{"name": ""}], ["anything"]) is None


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="pair up"):
        bleu4(TEXTS, TEXTS[:1])
    with pytest.raises(ValueError, match="pair up"):
        rouge(TEXTS[:1], TEXTS)
    with pytest.raises(ValueError, match="pair up"):
        pii_recovery([{"name": "x"}], TEXTS)


def test_leakage_metrics_bundles_everything():
    refs = ["the cat sat on the mat", "a b c d", "hello there my friend"]
    m = leakage_metrics(references=refs, hypotheses=refs, true_ids=TRUE, pred_ids=PRED, mask=MASK)
    assert isinstance(m, LeakageMetrics)
    assert m.bleu4 == pytest.approx(100.0) and m.rougeL == pytest.approx(100.0)
    assert m.token_accuracy == pytest.approx(0.7) and m.exact_match == pytest.approx(1 / 3)
    assert m.pii_recovery is None
    d = m.as_dict()
    assert set(d) == {"bleu4", "rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match", "pii_recovery"}
    assert all(v is None or math.isfinite(v) for v in d.values())

    with_pii = leakage_metrics(
        references=refs,
        hypotheses=refs,
        true_ids=TRUE,
        pred_ids=PRED,
        mask=MASK,
        pii=[{"name": "cat"}, {}, {"name": "friend"}],
    )
    assert with_pii.pii_recovery == pytest.approx(1.0)

    # "Bob" never reached the wire (not in the reference), so it is left out rather than counted missed.
    partial = leakage_metrics(
        references=refs,
        hypotheses=["the dog sat on the mat", "a b c d", "hello there my friend"],
        true_ids=TRUE,
        pred_ids=PRED,
        mask=MASK,
        pii=[{"name": "cat"}, {"name": "Bob"}, {"name": "friend"}],
    )
    assert partial.pii_recovery == pytest.approx(1 / 2)


def test_identical_short_corpus_still_scores_100():
    # Plain nltk BLEU-4 gives 31.6 here (no 4-grams); a perfect reconstruction must read as 100.
    assert bleu4(["the cat"], ["the cat"]) == 100.0
    assert bleu4(["the cat", "a dog"], ["the cat", "a dog"]) == 100.0
    imperfect = bleu4(["the cat", "a dog"], ["the cat", "a cat"])
    assert 0 < imperfect < 100


def test_bleu_all_empty_is_zero_even_when_references_are_empty():
    assert bleu4([""], [""]) == 0.0


def test_pii_truncated_fields_are_left_out_with_references():
    pii = [{"name": "John Smith", "phone": "555-0100"}]
    sent = ["Patient John Smith, call"]  # phone was truncated away before it left the client
    assert pii_recovery(pii, sent) == pytest.approx(1 / 2)
    assert pii_recovery(pii, sent, references=sent) == pytest.approx(1.0)
    assert pii_recovery([{"phone": "555-0100"}], ["x"], references=["y"]) is None
    with pytest.raises(ValueError, match="pair up"):
        pii_recovery(pii, sent, references=sent * 2)


def test_pii_non_string_values_are_compared_as_text():
    assert pii_hits({"account": 12345, "dob": None}, "account 12345") == {"account": True}
