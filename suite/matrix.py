"""The threat-model matrix: model × split × threat × attack × defense, expanded into cells and run.

Cells whose attack needs more than the threat grants are left out (and listed). Each distinct training
setup — split, defense, and, for an active attack, the deviating server — is trained once; every passive
cell on it reuses the same capture. Each cell is written to the results store the moment it finishes, under
a key that hashes its config, the model revision and the seed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
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

from suite.attack import ATTACKS, make_attack
from suite.config import ExperimentConfig
from suite.defense import make_defense
from suite.errors import ConfigError
from suite.split import SplitSpec
from suite.store import METRICS, ResultsStore
from suite.threats import THREATS, Capability, get_threat


def _named(entry: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    params = {k: v for k, v in entry.items() if k != "name"}
    return entry["name"], params


@dataclass(frozen=True)
class Cell:
    head_blocks: int
    tail_blocks: int
    threat: str
    attack: str
    attack_params: str  # canonical JSON (hashable)
    defense: str
    defense_params: str

    @property
    def spec(self) -> SplitSpec:
        return SplitSpec(self.head_blocks, self.tail_blocks)

    def label(self) -> str:
        d = self.defense if self.defense_params == "{}" else f"{self.defense}{self.defense_params}"
        return f"k={self.head_blocks} {self.threat}/{self.attack}/{d}"

    def training_group(self) -> tuple:
        """Cells with the same group share one training run and one capture."""
        active = ATTACKS.get(self.attack).active
        return (self.head_blocks, self.tail_blocks, self.defense, self.defense_params,
                (self.threat, self.attack, self.attack_params) if active else None)


def _canon(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def validate_matrix(cfg: ExperimentConfig) -> None:
    """Every name and parameter in [matrix] exists; errors name the entry."""
    m = cfg.matrix
    for i, t in enumerate(m.threats):
        if t not in THREATS:
            raise ConfigError(f"matrix.threats[{i}]: unknown threat {t!r}; presets are: {', '.join(THREATS)}")
    for i, entry in enumerate(m.attacks):
        name, params = _named(entry)
        try:
            cls = ATTACKS.get(name)
            fits = [t for t in THREATS.values() if not t.missing(cls.requires)]
            make_attack(name, fits[0] if fits else next(iter(THREATS.values())), params)
        except ConfigError as err:
            raise ConfigError(f"matrix.attacks[{i}]: {err}") from None
    for i, entry in enumerate(m.defenses):
        name, params = _named(entry)
        try:
            make_defense(name, params)
        except ConfigError as err:
            raise ConfigError(f"matrix.defenses[{i}]: {err}") from None
    for k in m.splits:
        if k + m.tail_blocks < 0:
            raise ConfigError(f"matrix.splits: {k} is not a valid head block count")


def expand(cfg: ExperimentConfig) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """All cells of the matrix, and the left-out cells with the reason each is left out."""
    validate_matrix(cfg)
    m = cfg.matrix
    cells, skipped = [], []
    for k in m.splits:
        for threat_name in m.threats:
            threat = get_threat(threat_name)
            for attack_entry in m.attacks:
                attack, aparams = _named(attack_entry)
                missing = threat.missing(ATTACKS.get(attack).requires)
                for defense_entry in m.defenses:
                    defense, dparams = _named(defense_entry)
                    cell = Cell(k, m.tail_blocks, threat_name, attack, _canon(aparams), defense, _canon(dparams))
                    if missing:
                        reason = f"{attack} needs {', '.join(sorted(c.value for c in missing))}; {threat_name} does not grant it"
                        skipped.append((cell, reason))
                    else:
                        cells.append(cell)
    return cells, skipped


def cell_key(cell: Cell, cfg: ExperimentConfig, revision: str) -> str:
    """Hash of everything that determines the cell's result: its own axes, the model revision, the data,
    the training setup and the seed."""
    payload = {
        "cell": cell.__dict__,
        "model": cfg.model.name,
        "revision": revision,
        "data": cfg.data.model_dump(),
        "training": cfg.training.model_dump(exclude={"head_blocks", "tail_blocks"}),
    }
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


def _row(cell: Cell, key: str, cfg: ExperimentConfig, revision: str) -> dict[str, Any]:
    return {
        "key": key, "model": cfg.model.name, "revision": revision, "head_blocks": cell.head_blocks,
        "tail_blocks": cell.tail_blocks, "strategy": cfg.training.strategy, "threat": cell.threat,
        "attack": cell.attack, "attack_params": json.loads(cell.attack_params), "defense": cell.defense,
        "defense_params": json.loads(cell.defense_params), "seed": cfg.training.seed,
        "config": cfg.model_dump(), "versions": versions(),
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
    from suite.cell import attack_trained, train_split
    from suite.experiment import load_for

    first = cells[0]
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
            defense = make_defense(first.defense, json.loads(first.defense_params))
            trained = train_split(cfg, first.spec, base, threat, active, defense)
            train_error = None
        except Exception as err:  # the whole group fails; each cell records why, the run goes on
            trained, train_error = None, _error(err)
        shared: dict[tuple, tuple[str, dict[str, Any]]] = {}  # observation_key -> (first threat, its fields)
        for cell, key in zip(cells, keys, strict=True):
            row = _row(cell, key, cfg, base.revision)
            if trained is None:
                row.update(status="failed", error=f"training failed: {train_error}")
            else:
                try:
                    threat = get_threat(cell.threat)
                    attack = make_attack(cell.attack, threat, json.loads(cell.attack_params))
                    same = observation_key(cell, cfg.training.clients)
                    if same in shared:  # the same attack on the same observations: the same computation
                        first, fields = shared[same]
                        note = f"same observations as {first} (computed once)"
                        row.update(fields, note=f"{fields['note']}; {note}" if fields["note"] else note)
                    else:
                        result = attack_trained(trained, threat, attack, cfg)
                        fields = dict(result.metrics.as_dict(), utility=result.utility,
                                      attack_seconds=result.cost.seconds, attack_peak_rss_mib=result.cost.peak_rss_mib,
                                      status="ok", error=None, note=result.reconstruction.note,
                                      defense_report=result.defense_report, samples=_samples(result))
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


def _error(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}{at}"


def run_matrix(cfg: ExperimentConfig, out: str | Path, *, workers: int = 1, executor: str = "local",
               address: str | None = None,
               on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run every missing cell of ``cfg``'s matrix into ``out``; returns counts and the left-out cells.

    ``executor``: ``"local"`` (this process, or ``workers`` processes) or ``"ray"`` (one Ray task per training
    group on the cluster at ``address``, or a local one). Either way rows land in the same store, cell by
    cell, and a rerun finishes only what is missing."""
    from suite.experiment import load_for

    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}; choose 'local' or 'ray'")
    out = str(out)
    cells, skipped = expand(cfg)
    ray = _import_ray() if executor == "ray" else None
    base = load_for(cfg)
    with ResultsStore(out) as store:
        done = store.done()
    keys = {c: cell_key(c, cfg, base.revision) for c in cells}
    todo = [c for c in cells if keys[c] not in done]
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
    return {"cells": len(cells), "ran": len(todo), "skipped": skipped, "groups": len(groups)}


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
