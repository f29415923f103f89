"""Scheduling a matrix: the groups of its missing cells run here (``local``), in worker processes, or as
Ray tasks, and every row lands in the same results store cell by cell, so a rerun finishes only what is
missing. What the cells are is ``suite.experiment.plan``; running one group, ``suite.experiment.run``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from suite.errors import ConfigError
from suite.experiment.config import ExperimentConfig
from suite.experiment.plan import Cell, cell_key, cell_row, expand
from suite.experiment.prepared import load_for
from suite.experiment.revision import code_revision
from suite.experiment.run import error_line, run_group
from suite.experiment.seeds import aggregate_seeds
from suite.experiment.store import ResultsStore
from suite.interfaces.attack import ATTACKS


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
                            row = cell_row(cell, keys[cell], cfg, revision)
                            row.update(status="failed", error=f"ray task failed: {error_line(err)}")
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
