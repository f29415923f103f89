"""The threat-model matrix: model × split × threat × attack × defense, expanded into cells and run.

Cells whose attack needs more than the threat grants are left out (and listed). Each distinct training
setup — split, defense, and, for an active attack, the deviating server — is trained once; every passive
cell on it reuses the same capture. Each cell is written to the results store the moment it finishes, under
a key that hashes its config, the model revision and the seed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.config import ExperimentConfig
from suite.experiment.preflight import colluder_problem
from suite.experiment.revision import code_revision, key_part
from suite.experiment.store import METRICS, ResultsStore
from suite.interfaces.attack import ATTACKS, make_attack
from suite.interfaces.defense import DEFENSES, make_defense
from suite.interfaces.threats import THREATS, Capability, get_threat


def _named(entry: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    params = {k: v for k, v in entry.items() if k != "name"}
    return entry["name"], params


def _sweep(where: str, entry: str | dict[str, Any], check: Callable[[str, dict[str, Any]], None]
           ) -> list[tuple[str, dict[str, Any]]]:
    """An attack or defense entry with list-valued parameters expands to one entry per combination
    (several lists: their product, in the order given). ``check`` builds one entry; its error is reported
    against the parameter and value that caused it (``matrix.defenses[2].eta[1]: ...``)."""
    name, params = _named(entry)
    swept = {k: v for k, v in params.items() if isinstance(v, list)}
    for k, values in swept.items():
        if not values:
            raise ConfigError(f"{where}.{k}: an empty list sweeps nothing; give at least one value")
        if len({_canon({"v": v}) for v in values}) != len(values):
            raise ConfigError(f"{where}.{k}: {values} repeats a value")
    first = {k: v[0] for k, v in swept.items()}
    for k, values in swept.items():  # each value on its own, the other swept parameters at their first
        for j, v in enumerate(values):
            try:
                check(name, {**params, **first, k: v})
            except ConfigError as err:
                raise ConfigError(f"{where}.{k}[{j}]: {err}") from None
    combos = [dict(zip(swept, vals, strict=True)) for vals in itertools.product(*swept.values())]
    out = []
    for combo in combos:
        try:
            check(name, {**params, **combo})
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        out.append((name, {**params, **combo}))
    return out


AXES = ("steps", "finetune", "seed")  # training axes a cell may override ([matrix] steps / finetune / seeds)
SHARE_WIRE_ONLY_TRAINING = True  # a wire_only defense (encryption) reuses the undefended run's training


@dataclass(frozen=True)
class Cell:
    head_blocks: int
    tail_blocks: int
    threat: str
    attack: str
    attack_params: str  # canonical JSON (hashable)
    defense: str
    defense_params: str
    steps: int | None = None  # None: [training]'s value
    finetune: str | None = None
    seed: int | None = None

    @property
    def spec(self) -> SplitSpec:
        return SplitSpec(self.head_blocks, self.tail_blocks)

    def label(self) -> str:
        d = self.defense if self.defense_params == "{}" else f"{self.defense}{self.defense_params}"
        a = self.attack if self.attack_params == "{}" else f"{self.attack}{self.attack_params}"
        axes = "".join(f" {k}={getattr(self, k)}" for k in AXES if getattr(self, k) is not None)
        return f"k={self.head_blocks} {self.threat}/{a}/{d}{axes}"

    def training_group(self) -> tuple:
        """Cells with the same group share one training run (and, but for a wire_only defense's frames, one
        capture)."""
        active = ATTACKS.get(self.attack).active
        defense, params = self.defense, self.defense_params
        if SHARE_WIRE_ONLY_TRAINING and DEFENSES.get(defense).wire_only:
            defense, params = "none", "{}"
        return (self.head_blocks, self.tail_blocks, defense, params, self.steps, self.finetune, self.seed,
                (self.threat, self.attack, self.attack_params) if active else None)

    def without_seed(self) -> Cell:
        return dataclasses.replace(self, seed=None)


def cell_config(cfg: ExperimentConfig, cell: Cell) -> ExperimentConfig:
    """``cfg`` with the cell's training axes (steps, finetune, seed) in [training]."""
    update = {k: getattr(cell, k) for k in AXES if getattr(cell, k) is not None}
    if not update:
        return cfg
    return cfg.model_copy(update={"training": cfg.training.model_copy(update=update)})


def _canon(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def validate_matrix(cfg: ExperimentConfig) -> None:
    """Every name and parameter in [matrix] exists; errors name the entry."""
    m = cfg.matrix
    for i, t in enumerate(m.threats):
        if t not in THREATS:
            raise ConfigError(f"matrix.threats[{i}]: unknown threat {t!r}; presets are: {', '.join(THREATS)}")
    _entries(cfg)
    for k in m.splits:
        if k + m.tail_blocks < 0:
            raise ConfigError(f"matrix.splits: {k} is not a valid head block count")


def _check_attack(name: str, params: dict[str, Any]) -> None:
    cls = ATTACKS.get(name)
    fits = [t for t in THREATS.values() if not t.missing(cls.requires)]
    make_attack(name, fits[0] if fits else next(iter(THREATS.values())), params)


def _entries(cfg: ExperimentConfig) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """The matrix's attacks and defenses with every sweep expanded (plus ``blind`` when it is on)."""
    m = cfg.matrix
    attacks = [a for i, e in enumerate(m.attacks) for a in _sweep(f"matrix.attacks[{i}]", e, _check_attack)]
    defenses = [d for i, e in enumerate(m.defenses)
                for d in _sweep(f"matrix.defenses[{i}]", e, lambda n, p: make_defense(n, p) and None)]
    if m.blind and "blind" not in {a for a, _ in attacks} and any(ATTACKS.get(a).kind == "inversion"
                                                                  for a, _ in attacks):
        attacks.append(("blind", {}))
    return attacks, defenses


def _skip_rule(rules: list[dict[str, Any]], threat: str, attack: str, aparams: dict, defense: str,
               dparams: dict) -> int | None:
    """The index of the first ``[matrix] skip`` rule the cell matches, or None."""
    have = {"threat": threat, "attack": attack, "defense": defense}
    for i, rule in enumerate(rules):
        names = all(have[k] == v for k, v in rule.items() if k in have)
        params = all(all(p.get(k) == v for k, v in rule[which].items())
                     for which, p in (("attack_params", aparams), ("defense_params", dparams)) if which in rule)
        if names and params:
            return i
    return None


def expand(cfg: ExperimentConfig) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """All cells of the matrix, and the left-out cells with the reason each is left out."""
    validate_matrix(cfg)
    m = cfg.matrix
    attacks, defenses = _entries(cfg)
    axes = list(itertools.product(m.steps or [None], m.finetune or [None], m.seeds or [None]))
    cells, skipped = [], []
    for k in m.splits:
        for threat_name in m.threats:
            threat = get_threat(threat_name)
            for attack, aparams in attacks:
                missing = threat.missing(ATTACKS.get(attack).requires)
                too_few = colluder_problem(threat, cfg.training.clients)
                for defense, dparams in defenses:
                    for steps, finetune, seed in axes:
                        cell = Cell(k, m.tail_blocks, threat_name, attack, _canon(aparams), defense, _canon(dparams),
                                    steps, finetune, seed)
                        rule = _skip_rule(m.skip, threat_name, attack, aparams, defense, dparams)
                        if too_few:
                            skipped.append((cell, too_few))
                        elif missing:
                            reason = f"{attack} needs {', '.join(sorted(c.value for c in missing))}; {threat_name} does not grant it"
                            skipped.append((cell, reason))
                        elif rule is not None:
                            skipped.append((cell, f"left out by matrix.skip[{rule}]"))
                        else:
                            cells.append(cell)
    return cells, skipped


def cell_key(cell: Cell, cfg: ExperimentConfig, revision: str, code: str | None = None) -> str:
    """Hash of everything that determines the cell's result: its own axes, the model revision, the data,
    the training setup and the seed, and (``code``: ``suite.experiment.revision.code_revision()``) the code that computes
    it. Without ``code`` it is the cell id, which rows of the same cell from other code share."""
    cfg = cell_config(cfg, cell)  # the axes enter through [training], so an unswept cell keeps its key
    payload = {
        "cell": {k: v for k, v in cell.__dict__.items() if k not in AXES},
        "model": cfg.model.name,
        "revision": revision,
        "data": cfg.data.model_dump(),
        "training": cfg.training.model_dump(exclude={"head_blocks", "tail_blocks"}),
    }
    if code is not None:
        payload["code"] = key_part(code)
    if cfg.model.dtype != "float32":  # the arithmetic changes results; fp32 keys stay as they were
        payload["dtype"] = cfg.model.dtype
    return hashlib.sha256(_canon(payload).encode()).hexdigest()[:24]


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("splitleak", "torch", "transformers", "peft", "cryptography", "nltk", "rouge-score", "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def aggregate_key(cell: Cell, cfg: ExperimentConfig, revision: str, code: str | None = None) -> str | None:
    """The key of the row that pools a cell's seeds, or None when the matrix has at most one seed."""
    if cell.seed is None or len(cfg.matrix.seeds or ()) < 2:
        return None
    return "agg-" + cell_key(cell.without_seed(), cfg, revision, code)[4:]


def _row(cell: Cell, key: str, cfg: ExperimentConfig, revision: str) -> dict[str, Any]:
    agg = aggregate_key(cell, cfg, revision, code_revision())
    cfg = cell_config(cfg, cell)
    return {
        "steps": cfg.training.steps, "finetune": cfg.training.finetune, "aggregate_key": agg,
        "key": key, "model": cfg.model.name, "revision": revision, "head_blocks": cell.head_blocks,
        "tail_blocks": cell.tail_blocks, "strategy": cfg.training.strategy, "threat": cell.threat,
        "attack": cell.attack, "attack_params": json.loads(cell.attack_params), "defense": cell.defense,
        "defense_params": json.loads(cell.defense_params), "seed": cfg.training.seed,
        "config": cfg.model_dump(), "versions": versions(),
        "code_revision": code_revision(), "cell_id": cell_key(cell, cfg, revision),
    }


def _samples(result, n: int = 5) -> list[dict[str, Any]]:
    from reports.metrics import pii_hits

    out = []
    cap_records = result.records
    for ref, hyp, rec in list(zip(result.references, result.reconstruction.texts or [""] * len(result.references),
                                  cap_records, strict=False))[:n]:
        hits = pii_hits(rec.pii, hyp) if rec.pii else {}
        out.append({"reference": ref, "reconstruction": hyp,
                    "pii": {f: [v, bool(hits.get(f))] for f, v in rec.pii.items()}})
    return out


def observation_key(cell: Cell, clients: int) -> tuple | None:
    """Two passive cells of one training group with equal keys hand their attack the same observations:
    the same victims and every granted capability except control of the server, which a passive attack
    never exercises (e.g. ``curious_server`` and ``malicious_server``). Such a cell is computed once and its
    row says so. Active attacks train their own group and get ``None``."""
    if ATTACKS.get(cell.attack).active:
        return None
    threat = get_threat(cell.threat)
    victims = tuple(c for c in range(clients) if c != threat.colluder) or (0,)
    return (cell.attack, cell.attack_params, victims, threat.grants - {Capability.CONTROL_SERVER})


_BASES: dict[tuple[str, str], Any] = {}  # the base model of a worker process, kept between the groups it runs


def run_group(cfg: ExperimentConfig, cells: list[Cell], keys: list[str], out: str | None, base=None,
              on_cell: Callable[[str], None] | None = None,
              sink: Callable[[dict[str, Any]], None] | None = None) -> list[str]:
    """Train one group's setup once and run its cells, writing each row to the store in ``out`` as soon as
    it exists (or handing it to ``sink``). Returns the labels of the cells written (ok or failed). Runs in a
    worker process when ``--workers`` > 1, and in a Ray task with the Ray executor."""
    from suite.experiment.cell import attack_trained, rewire, train_split
    from suite.experiment.prepared import load_for

    first = cells[0]
    gcfg = cell_config(cfg, first)  # every cell of a group has the same training axes
    store = ResultsStore(out) if sink is None else None
    write = sink if sink is not None else store.write
    done = []
    try:
        if base is None:  # a worker process or Ray task: load once per process, reuse for its next groups
            if (cfg.model.name, cfg.model.dtype) not in _BASES:
                _BASES.clear()
                _BASES[(cfg.model.name, cfg.model.dtype)] = load_for(cfg, progress=lambda _: None)
            base = _BASES[(cfg.model.name, cfg.model.dtype)]
        try:
            threat = get_threat(first.threat)
            group_attack = make_attack(first.attack, threat, json.loads(first.attack_params))
            active = group_attack if group_attack.active else None
            trained_as = first.training_group()[2:4]  # a wire_only defense trains as "none" and is rewired
            defense = make_defense(trained_as[0], json.loads(trained_as[1]))
            trained = train_split(gcfg, first.spec, base, threat, active, defense)
            train_error = None
        except Exception as err:  # the whole group fails; each cell records why, the run goes on
            trained, train_error = None, _error(err)
        variants: dict[tuple[str, str], Any] = {}  # (defense, params) -> the trained split under it
        blinds: dict[tuple, Any] = {}  # (defense, params, victims) -> blind's CellResult, or why it failed

        def under(cell: Cell):
            d = (cell.defense, cell.defense_params)
            if d not in variants:
                variants[d] = trained if d == trained_as else rewire(trained, make_defense(d[0], json.loads(d[1])))
            return variants[d]

        def blind_of(cell: Cell):
            threat = get_threat(cell.threat)
            victims = tuple(c for c in range(cfg.training.clients) if c != threat.colluder) or (0,)
            b = (cell.defense, cell.defense_params, victims)
            if b not in blinds:
                try:
                    blinds[b] = attack_trained(under(cell), threat, make_attack("blind", threat), gcfg)
                except Exception as err:
                    blinds[b] = _error(err)
            return blinds[b]

        # (defense, params, observation_key) -> (first threat, its fields)
        shared: dict[tuple, tuple[str, dict[str, Any]]] = {}
        for cell, key in zip(cells, keys, strict=True):
            row = _row(cell, key, cfg, base.revision)
            if trained is None:
                row.update(status="failed", error=f"training failed: {train_error}")
            else:
                try:
                    threat = get_threat(cell.threat)
                    attack = make_attack(cell.attack, threat, json.loads(cell.attack_params))
                    same = observation_key(cell, cfg.training.clients)
                    same = None if same is None else (cell.defense, cell.defense_params, same)
                    if same in shared:  # the same attack on the same observations: the same computation
                        first, fields = shared[same]
                        note = f"same observations as {first} (computed once)"
                        row.update(fields, note=f"{fields['note']}; {note}" if fields["note"] else note)
                    else:
                        is_blind = cell.attack == "blind" and cell.attack_params == "{}"
                        blind = blind_of(cell) if cfg.matrix.blind and attack.kind == "inversion" else None
                        if is_blind and not isinstance(blind, str | type(None)):
                            result = blind
                        else:
                            result = attack_trained(under(cell), threat, attack, gcfg)
                        fields = dict(result.metrics.as_dict(), utility=result.utility, **result.utility_fields(),
                                      attack_seconds=result.cost.seconds, attack_peak_rss_mib=result.cost.peak_rss_mib,
                                      status="ok", error=None, note=result.reconstruction.note,
                                      defense_report=result.defense_report, samples=_samples(result),
                                      adaptive=None if result.adaptive is None else int(result.adaptive))
                        fields.update(_interval_fields(result, blind, under(cell)))
                        if isinstance(blind, str):
                            note = f"no advantage over blind: the blind baseline failed: {blind}"
                            fields["note"] = f"{fields['note']}; {note}" if fields["note"] else note
                        row.update(fields)
                        if same is not None:
                            shared[same] = (cell.threat, fields)
                except Exception as err:
                    row.update(status="failed", error=_error(err))
            write(row)
            done.append(cell.label())
            if on_cell is not None:
                on_cell(cell.label())
    finally:
        if store is not None:
            store.close()
    return done


def _interval_fields(result, blind, trained) -> dict[str, Any]:
    """Bootstrap intervals of the cell's metrics and utility, its advantage over ``blind`` (the blind
    baseline's CellResult on the same records, or None / an error string), and the per-record statistics
    behind them (``record_scores``, which the seed aggregation pools)."""
    import numpy as np

    from reports.intervals import summarize, to_json, utility_summary

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


def aggregate_seeds(cfg: ExperimentConfig, out: str, cells: list[Cell], revision: str,
                    code: str | None = None) -> int:
    """For every cell whose seeds have all finished, (re)write its aggregate row: metrics, intervals and
    advantages over records x seeds from the per-seed rows' ``record_scores``. Returns how many."""
    import numpy as np

    from reports.intervals import from_json, summarize, utility_summary

    if len(cfg.matrix.seeds or ()) < 2:
        return 0
    members: dict[Cell, list[Cell]] = {}
    for c in cells:
        members.setdefault(c.without_seed(), []).append(c)
    written = 0
    with ResultsStore(out) as store:
        rows = {r["key"]: r for r in store.rows(per_seed=True)}
        for cell, seeded in members.items():
            mine = [rows.get(cell_key(c, cfg, revision, code)) for c in seeded]
            if any(r is None for r in mine):
                continue
            key = aggregate_key(seeded[0], cfg, revision, code)
            row = _row(cell, key, cfg, revision)
            seeds = [r["seed"] for r in mine]
            row.update(seed=None, seeds=seeds, aggregate_key=None, defense_report=mine[0]["defense_report"],
                       samples=mine[0]["samples"], attack_seconds=sum(r["attack_seconds"] or 0 for r in mine),
                       attack_peak_rss_mib=max(r["attack_peak_rss_mib"] or 0 for r in mine))
            failed = [r for r in mine if r["status"] != "ok"]
            if failed:
                row.update(status="failed", error=f"seed {failed[0]['seed']} failed: {failed[0]['error']}")
            elif any(r["record_scores"] is None for r in mine):  # rows of an older version: means only
                row.update({m: float(np.mean([r[m] for r in mine])) if all(r[m] is not None for r in mine) else None
                            for m in (*METRICS, "utility")}, status="ok", error=None,
                           note=f"mean over seeds {seeds} (no per-record scores: no intervals)")
            else:
                scores = [json.loads(r["record_scores"]) for r in mine]
                stats = [from_json(s["stats"]) for s in scores]
                blind = [from_json(s["blind"]) for s in scores] if all("blind" in s for s in scores) else None
                row.update(summarize(stats, blind), status="ok", error=None,
                           note=f"mean over records x seeds {seeds}")
                if all(s.get("utility") for s in scores):
                    row.update(utility_summary([np.asarray(s["utility"]) for s in scores]))
                else:
                    row.update(utility=float(np.mean([r["utility"] for r in mine])))
            store.write(row)
            written += 1
    return written


def _error(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}{at}"


def run_matrix(cfg: ExperimentConfig, out: str | Path, *, workers: int = 1, executor: str = "local",
               address: str | None = None,
               on_progress: Callable[[int, int, str], None] | None = None, retry_failed: bool = False,
               keep_stale: bool = False, on_note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every missing cell of ``cfg``'s matrix into ``out``; returns counts and the left-out cells.

    ``executor``: ``"local"`` (this process, or ``workers`` processes) or ``"ray"`` (one Ray task per training
    group on the cluster at ``address``, or a local one). Either way rows land in the same store, cell by
    cell, and a rerun finishes only what is missing.

    Keys include the code revision. Rows of the same cell computed by other code (stale rows) are not reused:
    their cells run again and the new row replaces the stale one (``keep_stale`` keeps and reuses them
    instead); ``on_note`` hears how many there are and from which revision. Failed rows count as done
    unless ``retry_failed``. The summary's ``failed`` counts this matrix's failed rows after the run."""
    from suite.experiment.prepared import load_for

    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; choose 'local' or 'ray'")
    out = str(out)
    cells, skipped = expand(cfg)
    ray = _import_ray() if executor == "ray" else None
    base = load_for(cfg)
    code = code_revision()
    with ResultsStore(out) as store:
        status = store.statuses()
        by_cell = store.revisions_by_cell()
    keys = {c: cell_key(c, cfg, base.revision, code) for c in cells}
    stale: dict[str, int] = {}  # other code revision -> rows of this matrix's cells it computed
    stale_cells = set()
    for c in cells:
        if keys[c] in status:
            continue
        for key, rev in by_cell.get(cell_key(c, cfg, base.revision), []):
            if key != keys[c]:
                label = rev or "unknown (written before rows recorded it)"
                stale[label] = stale.get(label, 0) + 1
                stale_cells.add(c)
    note = on_note or (lambda _: None)
    for rev, n in sorted(stale.items()):
        verb = "kept and reused (--keep-stale)" if keep_stale else "ignored: recomputed now (--keep-stale reuses them)"
        note(f"{n} row{'s' if n != 1 else ''} from revision {rev} {'are' if n != 1 else 'is'} {verb}")
    retry = {c for c in cells if retry_failed and status.get(keys[c]) == "failed"}
    if retry:
        note(f"retrying {len(retry)} failed cell{'s' if len(retry) != 1 else ''}")
    todo = [c for c in cells if (keys[c] not in status and not (keep_stale and c in stale_cells)) or c in retry]
    groups: dict[tuple, list[Cell]] = {}
    for c in todo:
        groups.setdefault(c.training_group(), []).append(c)
    finished = len(cells) - len(todo)
    report = on_progress or (lambda *_: None)
    report(finished, len(cells), "resuming" if finished else "starting")

    def cell_done(label: str) -> None:
        nonlocal finished
        finished += 1
        report(finished, len(cells), label)

    if ray is not None:
        if groups:
            _run_on_ray(ray, cfg, list(groups.values()), keys, out, address, base.revision, cell_done)
    elif workers <= 1:
        for group in groups.values():
            report(finished, len(cells), f"training {group[0].label()}")
            run_group(cfg, group, [keys[c] for c in group], out, base, on_cell=cell_done)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # Longest first: groups that train an active attack (FSHA's hijacked run) cost several times an
        # honest group, and starting them last would leave one worker idle at the end.
        ordered = sorted(groups.values(), key=lambda g: not ATTACKS.get(g[0].attack).active)
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(threads,)) as pool:
            pending = {pool.submit(run_group, cfg, g, [keys[c] for c in g], out) for g in ordered}
            label_of = {keys[c]: c.label() for c in todo}
            while pending:  # the workers write the store; report each new row as it lands
                finished_now, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    fut.result()  # a worker that died takes its group's missing cells with it: raise
                with ResultsStore(out) as store:
                    landed = store.done() & label_of.keys()
                for key in sorted(landed, key=label_of.get):
                    cell_done(label_of.pop(key))
    aggregated = aggregate_seeds(cfg, out, cells, base.revision, code)
    with ResultsStore(out) as store:
        status = store.statuses()
    failed = sum(1 for c in cells if status.get(keys[c]) == "failed")
    return {"cells": len(cells), "ran": len(todo), "skipped": skipped, "groups": len(groups), "failed": failed,
            "stale": stale, "code_revision": code, "aggregated": aggregated}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'splitleak[ray]'") from None
    return ray


def _group_rows(cfg: ExperimentConfig, cells: list[Cell], keys: list[str], threads: int) -> list[dict[str, Any]]:
    """A Ray task: one training group, its rows returned to the driver (which owns the store)."""
    _worker_init(threads)
    rows: list[dict[str, Any]] = []
    run_group(cfg, cells, keys, None, sink=rows.append)
    return rows


def _run_on_ray(ray, cfg: ExperimentConfig, groups: list[list[Cell]], keys: dict[Cell, str], out: str,
                address: str | None, revision: str, cell_done: Callable[[str], None]) -> None:
    """Fan the groups out as Ray tasks; write each task's rows the moment it returns. A Ray cluster is one
    trust domain: fine for an experiment matrix (every cell is simulated inside one task)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    res = cfg.executor
    task = ray.remote(num_cpus=res.cpus_per_task, num_gpus=res.gpus_per_task, max_retries=0)(_group_rows)
    threads = max(1, int(res.cpus_per_task))
    try:
        pending = {task.remote(cfg, g, [keys[c] for c in g], threads): g for g in groups}
        with ResultsStore(out) as store:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    group = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except Exception as err:  # the task died (node lost, OOM): its cells record why
                        rows = []
                        for cell in group:
                            row = _row(cell, keys[cell], cfg, revision)
                            row.update(status="failed", error=f"ray task failed: {_error(err)}")
                            rows.append(row)
                    for row, cell in zip(rows, group, strict=True):
                        store.write(row)
                        cell_done(cell.label())
    finally:
        if started:
            ray.shutdown()


def _worker_init(threads: int) -> None:
    import torch

    from suite.engine.quiet import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(threads)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the store (what `splitleak results` prints)."""
    head = ["k", "threat", "attack", "defense", *METRICS, "utility", "secs", "status"]
    lines = [head]
    for r in rows:
        def fmt(v, digits=3):
            return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

        d = r["defense"] if r["defense_params"] in (None, "{}") else f"{r['defense']}{r['defense_params']}"
        lines.append([str(r["head_blocks"]), r["threat"], r["attack"], d,
                      *(fmt(r[m], 2 if m.startswith(("bleu", "rouge")) else 3) for m in METRICS),
                      fmt(r["utility"]), fmt(r["attack_seconds"], 1),
                      r["status"] if r["status"] == "ok" else f"failed: {r['error']}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in lines)
