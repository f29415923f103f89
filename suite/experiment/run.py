"""Running one training group end to end: train its setup once, run each of its cells' attacks on the
capture, score them, and write each row the moment the cell finishes.

A group (``Cell.training_group``) is every cell that shares one training run: the same split, training axes
and defense (a ``wire_only`` defense's cells are rewired from the undefended run) and, for an active attack,
the same deviating server. Passive cells that hand their attack the same observations are computed once.
This is what a worker process or a Ray task runs (``suite.experiment.schedule``).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from suite.experiment.cell import attack_trained, rewire, train_split
from suite.experiment.config import ExperimentConfig
from suite.experiment.inference_run import InferenceGroup
from suite.experiment.memorisation import memorisation_fields
from suite.experiment.plan import Cell, cell_config, cell_row, observation_key
from suite.experiment.prepared import load_for
from suite.experiment.store import METRICS, ResultsStore
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.threats import get_threat
from suite.scoring.intervals import summarize, to_json, utility_summary
from suite.scoring.metrics import pii_hits

_BASES: dict[tuple[str, str], Any] = {}  # the base model of a worker process, kept between the groups it runs


def run_group(cfg: ExperimentConfig, cells: list[Cell], keys: list[str], out: str | None, base=None,
              on_cell: Callable[[str], None] | None = None,
              sink: Callable[[dict[str, Any]], None] | None = None) -> list[str]:
    """Train one group's setup once and run its cells, writing each row to the store in ``out`` as soon as
    it exists (or handing it to ``sink``). Returns the labels of the cells written (ok or failed). Runs in a
    worker process when ``--workers`` > 1, and in a Ray task with the Ray executor."""
    store = ResultsStore(out) if sink is None else None
    write = sink if sink is not None else store.write
    done = []
    try:
        if base is None:  # a worker process or Ray task: load once per process, reuse for its next groups
            if (cfg.model.name, cfg.model.dtype) not in _BASES:
                _BASES.clear()
                _BASES[(cfg.model.name, cfg.model.dtype)] = load_for(cfg, progress=lambda _: None)
            base = _BASES[(cfg.model.name, cfg.model.dtype)]
        group = _Group(cfg, cells[0], base, reference=any(c.mode != "inference" for c in cells))
        for cell, key in zip(cells, keys, strict=True):
            row = cell_row(cell, key, cfg, base.revision)
            if group.trained is None:
                row.update(status="failed", error=f"training failed: {group.train_error}")
            else:
                try:
                    row.update(group.fields(cell))
                except Exception as err:
                    row.update(status="failed", error=error_line(err))
            write(row)
            done.append(cell.label())
            if on_cell is not None:
                on_cell(cell.label())
    finally:
        if store is not None:
            store.close()
    return done


class _Group:
    """One training group while its cells run: the split trained once (or why training failed), its variants
    under ``wire_only`` defenses (rewired, not retrained), the blind baselines per victim set, and the cells
    computed once for several threats."""

    def __init__(self, cfg: ExperimentConfig, first: Cell, base, reference: bool = True):
        self.cfg = cfg
        self.gcfg = cell_config(cfg, first)  # every cell of a group has the same training axes
        self.variants: dict[tuple[str, str], Any] = {}  # (defense, params) -> the trained split under it
        self.blinds: dict[tuple, Any] = {}  # (defense, params, victims) -> blind's CellResult, or why it failed
        self.shared: dict[tuple, tuple[str, dict[str, Any]]] = {}  # (defense, params, observation key) -> (threat, fields)
        self.inference = None  # the group's inference cells (suite.experiment.inference_run), made when first needed
        try:
            threat = get_threat(first.threat)
            group_attack = make_attack(first.attack, threat, json.loads(first.attack_params))
            active = group_attack if group_attack.active else None
            self.trained_as = first.training_group()[2:4]  # a wire_only defense trains as "none" and is rewired
            defense = make_defense(self.trained_as[0], json.loads(self.trained_as[1]))
            # inference rows report no centralised reference: a group of only those does not train one
            self.trained = train_split(self.gcfg, first.spec, base, threat, active, defense, reference)
            self.train_error = None
        except Exception as err:  # the whole group fails; each cell records why, the run goes on
            self.trained, self.train_error = None, error_line(err)

    def under(self, cell: Cell):
        d = (cell.defense, cell.defense_params)
        if d not in self.variants:
            self.variants[d] = (self.trained if d == self.trained_as
                                else rewire(self.trained, make_defense(d[0], json.loads(d[1]))))
        return self.variants[d]

    def blind_of(self, cell: Cell):
        threat = get_threat(cell.threat)
        victims = tuple(c for c in range(self.cfg.training.clients) if c != threat.colluder) or (0,)
        b = (cell.defense, cell.defense_params, victims)
        if b not in self.blinds:
            try:
                self.blinds[b] = attack_trained(self.under(cell), threat, make_attack("blind", threat), self.gcfg)
            except Exception as err:
                self.blinds[b] = error_line(err)
        return self.blinds[b]

    def fields(self, cell: Cell) -> dict[str, Any]:
        """The row's columns for ``cell``: its attack's metrics, intervals and advantage over blind."""
        if cell.mode == "inference":
            if self.inference is None:
                self.inference = InferenceGroup(self.cfg, self.gcfg, self.under, self.trained_as, error_line)
            return self.inference.fields(cell)
        threat = get_threat(cell.threat)
        attack = make_attack(cell.attack, threat, json.loads(cell.attack_params))
        if attack.kind == "memorisation":  # reads a trained model view, scored on canaries and members
            return memorisation_fields(self.under(cell), threat, attack, self.gcfg)
        same = observation_key(cell, self.cfg.training.clients)
        same = None if same is None else (cell.defense, cell.defense_params, same)
        if same in self.shared:  # the same attack on the same observations: the same computation
            first, fields = self.shared[same]
            note = f"same observations as {first} (computed once)"
            return {**fields, "note": f"{fields['note']}; {note}" if fields["note"] else note}
        is_blind = cell.attack == "blind" and cell.attack_params == "{}"
        blind = self.blind_of(cell) if self.cfg.matrix.blind and attack.kind == "inversion" else None
        if is_blind and not isinstance(blind, str | type(None)):
            result = blind
        else:
            result = attack_trained(self.under(cell), threat, attack, self.gcfg)
        fields = dict(result.metrics.as_dict(), utility=result.utility, **result.utility_fields(),
                      attack_seconds=result.cost.seconds, attack_peak_rss_mib=result.cost.peak_rss_mib,
                      status="ok", error=None, note=result.reconstruction.note,
                      defense_report=result.defense_report, samples=_samples(result),
                      adaptive=None if result.adaptive is None else int(result.adaptive),
                      stage_block=result.stage_block)
        fields.update(_interval_fields(result, blind, self.under(cell)))
        if isinstance(blind, str):
            note = f"no advantage over blind: the blind baseline failed: {blind}"
            fields["note"] = f"{fields['note']}; {note}" if fields["note"] else note
        if same is not None:
            self.shared[same] = (cell.threat, fields)
        return fields


def _samples(result, n: int = 5) -> list[dict[str, Any]]:
    out = []
    cap_records = result.records
    for ref, hyp, rec in list(zip(result.references, result.reconstruction.texts or [""] * len(result.references),
                                  cap_records, strict=False))[:n]:
        hits = pii_hits(rec.pii, hyp) if rec.pii else {}
        out.append({"reference": ref, "reconstruction": hyp,
                    "pii": {f: [v, bool(hits.get(f))] for f, v in rec.pii.items()}})
    return out


def _interval_fields(result, blind, trained) -> dict[str, Any]:
    """Bootstrap intervals of the cell's metrics and utility, its advantage over ``blind`` (the blind
    baseline's CellResult on the same records, or None / an error string), and the per-record statistics
    behind them (``record_scores``, which the seed aggregation pools)."""
    scores: dict[str, Any] = {"stats": to_json(result.scores)}
    baseline = None
    if blind is not None and not isinstance(blind, str):
        baseline = [blind.scores]
        scores["blind"] = to_json(blind.scores)
    out = {k: v for k, v in summarize([result.scores], baseline).items() if k not in METRICS}
    if trained.utility_scores:
        u = utility_summary([np.asarray(trained.utility_scores)])
        out.update(utility_lo=u["utility_lo"], utility_hi=u["utility_hi"])
        scores["utility"] = trained.utility_scores
    out["record_scores"] = scores
    return out


def error_line(err: BaseException) -> str:
    """One line for a failed cell's ``error``: the exception, its first line, and where it was raised."""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}{at}"
