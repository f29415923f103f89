"""Scoring a reconstruction against the truth: leakage metrics (BLEU, ROUGE, token accuracy, exact match, PII
recovery) and their bootstrap intervals and advantages. No torch: below both the experiment and the reports."""
