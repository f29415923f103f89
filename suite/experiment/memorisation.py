"""A memorisation cell: run a ``kind = "memorisation"`` attack on a trained split's model view and
score it with the ground truth the attack never sees (``suite.scoring.memorisation``).

The attack gets the views its threat grants and the parts of the audit it declares
(``suite.experiment.canaries``); what it returns is scored here:

* ``candidate_lppl`` / ``canary_lppl`` (canary_exposure): each canary's exposure, then their mean per repeat count
  and over all canaries (``exposure`` with its interval over canaries);
* ``scores`` (membership): AUC and TPR at 1 % / 0.1 % FPR of the chosen signal, members against non-members,
  with stratified bootstrap intervals; every signal's summary goes into ``memorisation``;
* ``guesses`` (extraction): the share of canaries whose secret came out verbatim (``extracted``), per repeat
  count and per decoding.

The per-canary values and the chosen signal's per-record scores go into ``record_scores`` (under
``"memorisation"``), from which ``pooled_fields`` makes a cell's aggregate row over seeds
(``suite.experiment.seeds``): means and intervals over records x seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import numpy as np

from suite.engine.models import LoadedModel
from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.canaries import CANARY_PREFIX, audit_set, secret_format, space_bits
from suite.experiment.cell import TrainedSplit, _observations, train_split
from suite.experiment.config import ExperimentConfig
from suite.interfaces.attack import Attack, make_attack, timed_reconstruct
from suite.interfaces.defense import make_defense
from suite.interfaces.presets import check_threat
from suite.interfaces.threats import MODEL_VIEWS, Audit, ThreatModel, get_threat, granted_views
from suite.scoring.memorisation import (
    exposure,
    exposure_by_rank,
    mean_summary,
    membership_summary,
    pooled_mean_summary,
    pooled_membership_summary,
    roc_points,
)

ROC_POINTS = 200  # points kept of each ROC curve for the report (log-spaced in FPR)
CANARY_HINT = "add [data] canaries = { count = 20, repeats = [1, 10, 50] } to the config"


def needs_canaries(attack: Attack) -> bool:
    """Whether the attack is scored on canaries (it audits them, or says it is scored on them: extraction)."""
    return "canaries" in attack.audits or bool(getattr(attack, "scored_on_canaries", False))


def check_memorisation(cfg: ExperimentConfig, threat: ThreatModel, attack: Attack) -> None:
    """What a memorisation cell needs from the run, refused before any training with one line each: canaries
    for an attack scored on them, a view the threat grants where the attack names one, and (for the canary
    victim, the last client) a client count the threat can run with."""
    check_threat(threat, cfg.training.clients)
    if needs_canaries(attack) and cfg.data.canaries is None:
        raise ConfigError(f"{attack.name} is scored on canaries and the run has none: {CANARY_HINT}")
    view = getattr(attack.config, "view", "auto")
    if view != "auto" and MODEL_VIEWS[view] not in threat.grants:
        granted = [v for v, cap in MODEL_VIEWS.items() if cap in threat.grants]
        raise ConfigError(f"threat {threat.name!r} does not grant the view {view!r}; use view = 'auto' or one of "
                          f"{', '.join(granted) or 'none (pick a threat such as adapter_thief or model_user)'}")


def run_memorisation_cell(cfg: ExperimentConfig, spec: SplitSpec, threat_name: str, attack_name: str,
                          params: dict | None = None, base: LoadedModel | None = None, defense_name: str = "none",
                          defense_params: dict | None = None) -> dict[str, Any]:
    """One memorisation cell from scratch (``splitleak attack``): refuse what cannot run before loading
    anything, train the split with the config's canaries, run the attack on the view its threat grants and
    return the row's fields (``memorisation_fields``)."""
    from suite.experiment.prepared import load_for

    threat = get_threat(threat_name)
    attack = make_attack(attack_name, threat, params)
    if attack.kind != "memorisation":
        raise ConfigError(f"{attack_name} is not a memorisation attack (canary_exposure, membership, extraction)")
    check_memorisation(cfg, threat, attack)
    defense = make_defense(defense_name, defense_params)
    base = base if base is not None else load_for(cfg)
    trained = train_split(cfg, spec, base, threat, None, defense, reference=False)
    return memorisation_fields(trained, threat, attack, cfg)


def memorisation_fields(trained: TrainedSplit, threat: ThreatModel, attack: Attack, cfg: ExperimentConfig
                        ) -> dict[str, Any]:
    prepared = trained.prepared
    canaries = prepared.canaries
    victim = len(prepared.private) - 1
    inserted = {c.text for c in canaries}
    members = [r for r in prepared.private[victim] if r.text not in inserted]
    truth = audit_set(canaries, members, prepared.held_out, cfg.training.seed)
    if needs_canaries(attack) and not canaries:
        raise ConfigError(f"{attack.name} is scored on canaries and the run has none: {CANARY_HINT}")
    audit = Audit(CANARY_PREFIX, secret_format(canaries),
                  canaries=tuple(c.text for c in canaries) if "canaries" in attack.audits else None,
                  queries=truth.queries if "queries" in attack.audits else None)
    obs = _observations(threat, prepared.session.split.spec, trained.base, cfg, trained.shadow, prepared, None,
                        trained.defense, attack, audit)
    if getattr(attack.config, "view", None) == "auto":  # every granted view; the one that reads most is reported
        runs = []
        for view in granted_views(obs) or ["auto"]:
            one = copy.copy(attack)
            one.config = dataclasses.replace(attack.config, view=view)
            runs.append(timed_reconstruct(one, obs))
        scored = [_score(r.extra, canaries, truth) for r, _ in runs]
        best = max(range(len(runs)), key=lambda i: _headline(scored[i][0]))
        (recon, cost), (out, detail, per_record) = runs[best], scored[best]
        detail["views"] = {r.extra.get("view"): _headline(o) for (r, _), (o, _, _) in zip(runs, scored, strict=True)}
    else:
        recon, cost = timed_reconstruct(attack, obs)
        out, detail, per_record = _score(recon.extra, canaries, truth)
    detail["canary_victim"] = victim
    return {**out, "memorisation": detail, "record_scores": {"memorisation": per_record},
            "utility": trained.utility, "perplexity": trained.perplexity,
            "optimizer_steps": trained.optimizer_steps, "attack_seconds": cost.seconds,
            "attack_peak_rss_mib": cost.peak_rss_mib, "status": "ok", "error": None, "note": recon.note,
            "defense_report": trained.defense.report()}


def _headline(out: dict[str, Any]) -> float:
    """What a view reads, to compare views: mean exposure, membership AUC or the share extracted."""
    for key in ("exposure", "auc", "extracted"):
        if out.get(key) is not None:
            return float(out[key])
    return float("-inf")


def _score(extra: dict, canaries, truth) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The fields, the ``memorisation`` detail and the per-record values (what seeds pool) of one attack run,
    scored against the ground truth."""
    detail: dict[str, Any] = {"view": extra.get("view")}
    out: dict[str, Any] = {}
    repeats = [c.repeats for c in canaries]
    per_record: dict[str, Any] = {"repeats": repeats}
    if "canary_lppl" in extra:
        bits = space_bits(secret_format(canaries))
        cand = extra["candidate_lppl"]
        whole = bool(extra.get("whole_space"))  # every secret scored: the exact rank, no fit
        exp = [(exposure_by_rank if whole else exposure)(c, cand, bits) for c in extra["canary_lppl"]]
        out.update(_mean("exposure", exp))
        per_record["exposure"] = exp
        detail.update(candidates=len(cand), space_bits=bits, exposure=exp,
                      exposure_method="rank in the whole space" if whole else "skew-normal fit to sampled candidates",
                      exposure_rank=[exposure_by_rank(c, cand, bits) for c in extra["canary_lppl"]],
                      by_repeats=_by_repeats(repeats, exp))
    if "scores" in extra:
        labels = np.asarray(truth.is_member)
        summaries = {}
        for signal, scores in extra["scores"].items():
            s = np.asarray(scores, dtype=float)
            summaries[signal] = membership_summary(s[labels], s[~labels])
        chosen = summaries[extra["signal"]]
        out.update({k: v for k, v in chosen.items() if not k.startswith("fp_at")})
        s = np.asarray(extra["scores"][extra["signal"]], dtype=float)
        per_record.update(members=s[labels].tolist(), non_members=s[~labels].tolist())
        fpr, tpr = roc_points(s[labels], s[~labels])
        detail.update(signal=extra["signal"], members=int(labels.sum()), non_members=int((~labels).sum()),
                      signals=summaries, roc=_thin(fpr, tpr),
                      false_positives={k: v for k, v in chosen.items() if k.startswith("fp_at")})
    if "guesses" in extra:
        guessed = {m: set(g) for m, g in extra["guesses"].items()}
        hit = [float(any(c.secret in g for g in guessed.values())) for c in canaries]
        out.update(_mean("extracted", hit, binary=True))
        per_record["extracted"] = hit
        detail.update(by_repeats=_by_repeats(repeats, hit, "extracted", binary=True),
                      by_decoding={m: sum(c.secret in g for c in canaries) for m, g in guessed.items()},
                      guesses={m: sorted(g)[:20] for m, g in guessed.items()})
    return out, detail, per_record


def pooled_fields(rows: list[dict[str, Any]], scores: list[dict[str, Any]]) -> dict[str, Any]:
    """A memorisation cell's aggregate row over seeds from its per-seed ``rows`` and their decoded
    ``record_scores``: exposure and the share extracted as means over canaries x seeds, AUC and TPR at low FPR
    as means of the seeds' values (each seed its own model and threshold), every interval over records x seeds
    (``suite.scoring.memorisation.pooled_*``); the ``memorisation`` detail is the first seed's with the pooled
    breakdown per repeat count, the member counts summed and the seeds named (its ROC curve is that seed's)."""
    per = [s["memorisation"] for s in scores]
    first = rows[0]["memorisation"]
    detail = dict(json.loads(first) if isinstance(first, str) else first or {})
    out: dict[str, Any] = {}
    repeats = per[0]["repeats"]
    if any(p["repeats"] != repeats for p in per):
        raise ValueError("the seeds' rows hold different canaries; they cannot be pooled")
    for name, binary in (("exposure", False), ("extracted", True)):
        if all(name in p for p in per):
            values = [p[name] for p in per]
            out.update(zip((name, f"{name}_lo", f"{name}_hi"), pooled_mean_summary(values, binary=binary),
                           strict=True))
            detail["by_repeats"] = {
                str(r): _pooled_by_repeat(name, [[v for v, k in zip(vs, repeats, strict=True) if k == r]
                                                for vs in values], binary) for r in sorted(set(repeats))}
    if all("members" in p for p in per):
        summary = pooled_membership_summary([(p["members"], p["non_members"]) for p in per])
        out.update({k: v for k, v in summary.items() if not k.startswith("fp_at")})
        detail.update(members=sum(len(p["members"]) for p in per),
                      non_members=sum(len(p["non_members"]) for p in per),
                      false_positives={k: v for k, v in summary.items() if k.startswith("fp_at")})
    detail.update(seeds=[r["seed"] for r in rows], roc_seed=rows[0]["seed"])
    # view = "auto" reports each seed's strongest view, which may differ: a pooled row of several views (or
    # membership signals) says so instead of carrying the first seed's name (which would, e.g., put a
    # defence's ε beside a number that is partly another view's)
    for key in ("view", "signal"):
        seen = [(json.loads(r["memorisation"]) if isinstance(r["memorisation"], str) else r["memorisation"] or {})
                .get(key) for r in rows]
        if len(set(seen)) > 1:
            detail[key] = "mixed: " + ", ".join(sorted({str(v) for v in seen}))
            detail[f"{key}_by_seed"] = dict(zip((str(r["seed"]) for r in rows), seen, strict=True))
    out["memorisation"] = detail
    return out


def _pooled_by_repeat(name: str, per_seed: list[list[float]], binary: bool) -> dict[str, Any]:
    mean, lo, hi = pooled_mean_summary(per_seed, binary=binary)
    every = [v for vs in per_seed for v in vs]
    return {name: mean, f"{name}_lo": lo, f"{name}_hi": hi, "canaries": len(per_seed[0]),
            f"{name}_max": max(every) if every else None}


def _mean(name: str, values: list[float], binary: bool = False) -> dict[str, float | None]:
    mean, lo, hi = mean_summary(values, binary=binary)
    return {name: mean, f"{name}_lo": lo, f"{name}_hi": hi}


def _by_repeats(repeats: list[int], values: list[float], name: str = "exposure", binary: bool = False
                ) -> dict[str, dict]:
    out = {}
    for r in sorted(set(repeats)):
        vals = [v for v, k in zip(values, repeats, strict=True) if k == r]
        mean, lo, hi = mean_summary(vals, binary=binary)
        out[str(r)] = {name: mean, f"{name}_lo": lo, f"{name}_hi": hi, "canaries": len(vals),
                       f"{name}_max": max(vals) if vals else None}
    return out


def _thin(fpr: list[float], tpr: list[float]) -> dict[str, list[float]]:
    """At most ``ROC_POINTS`` points of a ROC curve, log-spaced in FPR (the low-FPR end is what matters)."""
    f, t = np.asarray(fpr), np.asarray(tpr)
    if f.size <= ROC_POINTS:
        return {"fpr": f.tolist(), "tpr": t.tolist()}
    grid = np.unique(np.concatenate([[0.0], np.logspace(-5, 0, ROC_POINTS - 1)]))
    idx = np.clip(np.searchsorted(f, grid, side="right") - 1, 0, f.size - 1)
    return {"fpr": f[idx].tolist(), "tpr": t[idx].tolist()}
