"""The inference cells of one training group: capture the trained split serving its victims' prompts once per
defense, run each cell's attack on it and build the cell's row (``suite.experiment.run`` hands the cells over).

A row of an inference cell has ``mode = "inference"``, the plain metric columns over the whole observed
sequence, ``prompt_<metric>`` / ``response_<metric>`` with ``_lo`` / ``_hi`` and ``adv_prompt_<metric>`` /
``adv_response_<metric>`` (+ intervals) against the blind baseline on the same rows, and the
utility at inference: ``answer_rougeL``, ``seconds_per_token``, ``bytes_per_token``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from suite.experiment.config import ExperimentConfig
from suite.experiment.inference_cell import (
    PARTS,
    InferenceCapture,
    InferenceResult,
    answer_quality,
    attack_inference,
    capture_inference,
    under_wire_defense,
)
from suite.experiment.plan import Cell
from suite.interfaces.attack import make_attack
from suite.interfaces.threats import get_threat
from suite.scoring.intervals import from_json, summarize, to_json
from suite.scoring.metrics import pii_hits


class InferenceGroup:
    """``under(cell)`` is the group's trained split under the cell's defense (a ``wire_only`` one rewired)."""

    def __init__(self, cfg: ExperimentConfig, gcfg: ExperimentConfig, under: Callable[[Cell], Any],
                 trained_as: tuple[str, str], error_line: Callable[[BaseException], str]):
        self.cfg, self.gcfg, self.under = cfg, gcfg, under
        self.trained_as = trained_as  # the (defense, params) the group trained under
        self.error_line = error_line
        self.captures: dict[int, InferenceCapture] = {}  # id(prepared) -> the capture of that trained split
        self.reports: dict[int, dict] = {}  # id(prepared) -> the defense's report of training, before generation
        self.blinds: dict[tuple, InferenceResult | str] = {}

    def capture(self, cell: Cell) -> tuple[Any, InferenceCapture]:
        trained = self.under(cell)
        key = id(trained.prepared)
        if key not in self.captures:
            self.reports[key] = trained.defense.report()
            self.captures[key] = capture_inference(trained, self.gcfg)
        cap = self.captures[key]
        if (cell.defense, cell.defense_params) != self.trained_as:  # a wire_only defense, rewired
            cap = under_wire_defense(cap, trained.defense)
        return trained, cap

    def blind_of(self, cell: Cell) -> InferenceResult | str:
        threat = get_threat(cell.threat)
        key = (cell.defense, cell.defense_params, threat.colluder)
        if key not in self.blinds:
            try:
                trained, cap = self.capture(cell)
                self.blinds[key] = attack_inference(trained, cap, threat, make_attack("blind", threat), self.gcfg)
            except Exception as err:
                self.blinds[key] = self.error_line(err)
        return self.blinds[key]

    def defense_report(self, trained, cap: InferenceCapture) -> dict:
        """The defense's report of training, and where it accounts releases (DP), ``inference``: ε composed
        over one generation's releases (the prompt's and each sent token's)."""
        report = dict(self.reports[id(trained.prepared)])
        account = getattr(trained.defense, "inference_report", None)
        if account is not None:
            hidden = cap.batches[0].hidden.shape[-1] if cap.batches else 0
            report["inference"] = account(self.gcfg.inference.new_tokens, self.gcfg.data.max_length * hidden,
                                          int(report.get("releases_per_record") or 0))
        return report

    def fields(self, cell: Cell) -> dict[str, Any]:
        threat = get_threat(cell.threat)
        attack = make_attack(cell.attack, threat, json.loads(cell.attack_params))
        trained, cap = self.capture(cell)
        blind = self.blind_of(cell) if self.cfg.matrix.blind else None
        if cell.attack == "blind" and cell.attack_params == "{}" and isinstance(blind, InferenceResult):
            result = blind
        else:
            result = attack_inference(trained, cap, threat, attack, self.gcfg)
        adaptive = result.reconstruction.extra.get("adaptive") if isinstance(result.reconstruction.extra, dict) else None
        fields: dict[str, Any] = dict(
            result.metrics["all"].as_dict(), utility=trained.utility, perplexity=trained.perplexity,
            attack_seconds=result.cost.seconds, attack_peak_rss_mib=result.cost.peak_rss_mib, status="ok",
            error=None, note=result.reconstruction.note, defense_report=self.defense_report(trained, cap),
            samples=samples(result), adaptive=None if adaptive is None else int(adaptive),
            answer_rougeL=answer_quality(cap, trained.base.tokenizer), seconds_per_token=cap.seconds_per_token,
            bytes_per_token=cap.bytes_per_token)
        fields.update(interval_fields(result, blind if isinstance(blind, InferenceResult) else None))
        if isinstance(blind, str):
            note = f"no advantage over blind: the blind baseline failed: {blind}"
            fields["note"] = f"{fields['note']}; {note}" if fields["note"] else note
        return fields


def interval_fields(result: InferenceResult, blind: InferenceResult | None) -> dict[str, Any]:
    """Intervals and advantages of the whole sequence (plain columns) and of each part (prefixed), and the
    per-record statistics behind them."""
    out: dict[str, Any] = {}
    whole = summarize([result.scores["all"]], [blind.scores["all"]] if blind else None)
    out.update({k: v for k, v in whole.items() if k.endswith(("_lo", "_hi")) or k.startswith("adv_")})
    record_scores: dict[str, Any] = {"stats": to_json(result.scores["all"])}
    if blind is not None:
        record_scores["blind"] = to_json(blind.scores["all"])
    for part in PARTS:
        out.update(part_summary(part, [result.scores[part]], [blind.scores[part]] if blind else None))
        record_scores[part] = to_json(result.scores[part])
        if blind is not None:
            record_scores[f"blind_{part}"] = to_json(blind.scores[part])
    out["record_scores"] = record_scores
    return out


def part_summary(part: str, per_seed: list, blind: list | None) -> dict[str, Any]:
    """``summarize``'s columns for one part of the sequence, named ``<part>_<metric>…`` and
    ``adv_<part>_<metric>…`` (docs/inference.md)."""
    return {f"adv_{part}_{k[4:]}" if k.startswith("adv_") else f"{part}_{k}": v
            for k, v in summarize(per_seed, blind).items()}


def pooled_parts(scores: list[dict]) -> dict[str, Any]:
    """The prompt and response columns of a cell's seeds pooled (records x seeds), from their rows'
    ``record_scores``; nothing for training rows."""
    out: dict[str, Any] = {}
    for part in PARTS:
        if all(part in s for s in scores):
            blind = ([from_json(s[f"blind_{part}"]) for s in scores]
                     if all(f"blind_{part}" in s for s in scores) else None)
            out.update(part_summary(part, [from_json(s[part]) for s in scores], blind))
    return out


def samples(result: InferenceResult, n: int = 5) -> list[dict[str, Any]]:
    """The first ``n`` generations: the prompt, the answer, and what the attack read of each (PII hits in the
    prompt's reconstruction)."""
    out = []
    for i, rec in enumerate(result.records[:n]):
        prompt_hyp = result.hypotheses["prompt"][i]
        hits = pii_hits(rec.pii, prompt_hyp) if rec.pii else {}
        out.append({"reference": result.references["prompt"][i], "reconstruction": prompt_hyp,
                    "answer": result.answers[i], "response_reference": result.references["response"][i],
                    "response_reconstruction": result.hypotheses["response"][i],
                    "pii": {f: [v, bool(hits.get(f))] for f, v in rec.pii.items()}})
    return out
