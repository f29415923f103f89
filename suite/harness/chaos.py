"""Kill chaos: SIGKILL a small matrix run at random moments, resume it each time, compare with an uninterrupted run.

    python -m suite.harness.chaos --kills 20            # a longer check than CI's
    python -m suite.harness.chaos --kills 3             # what CI runs

An uninterrupted reference run comes first (its wall time sets the range of the random delays; no run
builds its report, so kills land among the cells). Then
``splitleak run`` is started on a second directory and killed with SIGKILL (its whole process group, worker
processes included) after a random delay, and started again, until ``--kills`` kills have landed inside a
running matrix; a run that finishes before its kill ends a round, and the next round starts on a fresh
directory, so every round is compared with the reference. Each attempt draws ``--workers`` 1 or 2.
Prints the kills, the rows lost and duplicated, and whether the final rows equal the reference (timing and
package-version columns aside). Exit 0 only when nothing was lost or duplicated and every round is equal.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from suite.experiment.store import ResultsStore, comparable

MATRIX = """
[model]
name = "tiny-llama"
[data]
max_length = 12
private = { generator = "records", size = 8, seed = 1 }
shadow = { generator = "records", size = 16, seed = 2 }
[training]
clients = 2
steps = 2
batch_size = 2
[matrix]
splits = [0, 1]
threats = ["curious_server", "eavesdropper", "colluding_client"]
attacks = ["nearest_embedding", "wire_inversion"]
defenses = ["none", "encryption"]
"""


def _cmd(config: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "suite.cli", "run", str(config), "--out", str(out), "--workers", str(workers),
            "--no-report"]


def _rows(out: Path) -> list[dict]:
    with ResultsStore(out) as store:
        return [{k: v for k, v in r.items() if k != "versions"} for r in comparable(store.rows())]


def _count(out: Path) -> int:
    try:
        with sqlite3.connect(out / "results.sqlite", timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _duplicates(out: Path) -> int:
    """Rows beyond the first of one cell (same cell id, or same key): 0 when every cell has one row."""
    with sqlite3.connect(out / "results.sqlite", timeout=30) as conn:
        ids = [r[0] for r in conn.execute("SELECT COALESCE(cell_id, key) FROM cells")]
    return len(ids) - len(set(ids))


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def chaos(kills: int, seed: int, work: Path, log=print, reference: tuple[Path, float] | None = None) -> dict:
    """``reference``: (directory, seconds) of an uninterrupted run of ``MATRIX`` by this code, to reuse."""
    rng = random.Random(seed)
    config = work / "matrix.toml"
    config.write_text(MATRIX)
    env = _env()
    if reference is not None:
        ref, ref_seconds = reference
    else:
        ref = work / "reference"
        start = time.perf_counter()
        subprocess.run(_cmd(config, ref, 1), check=True, capture_output=True, env=env)
        ref_seconds = time.perf_counter() - start
    reference = _rows(ref)
    total = len(reference)
    log(f"reference: {total} rows in {ref_seconds:.1f} s (uninterrupted)")
    landed, rounds, lost, duplicated, unequal, attempts = 0, 0, 0, 0, 0, 0
    mid = 0  # kills that landed after the attempt had written rows (mid-matrix, not during start-up)
    full = ref_seconds  # estimated wall time of a whole run: the fastest seen so far (load varies)
    while landed < kills:
        rounds += 1
        out = work / f"round-{rounds}"
        while True:
            attempts += 1
            workers = rng.choice([1, 2])
            before = _count(out)
            # somewhere inside what is left of the run (interpreter start-up included)
            delay = rng.uniform(0.1, 1.0) * full * max(0.3, (total - before) / total)
            began = time.perf_counter()
            proc = subprocess.Popen(_cmd(config, out, workers), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
            try:
                proc.wait(timeout=delay if before < total else None)  # every row in: let it finish
                finished = True
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-flight
                proc.wait()
                finished = False
            after = _count(out)
            if finished:
                if proc.returncode != 0:
                    raise SystemExit(f"chaos: the resumed run exited {proc.returncode}; see `splitleak results {out}`")
                full = min(full, (time.perf_counter() - began) * total / max(1, total - before))
                log(f"round {rounds}: finished before its kill ({after} rows)")
                break
            if after < before:
                lost += before - after
            landed += 1  # every row was not yet in: a kill inside a running matrix
            mid += after > before
            log(f"kill {landed}: after {delay:.1f} s, workers={workers}, rows {before} -> {after}")
            if landed >= kills:
                subprocess.run(_cmd(config, out, 1), check=True, capture_output=True, env=env)  # finish it
                break
        rows = _rows(out)
        lost += len({r["key"] for r in reference} - {r["key"] for r in rows})
        duplicated += _duplicates(out) + max(0, len(rows) - total)
        unequal += rows != reference
    summary = {"kills": landed, "kills_after_new_rows": mid, "rounds": rounds, "attempts": attempts, "lost": lost, "duplicated": duplicated,
               "equal": unequal == 0, "rows": total}
    log(f"chaos: {landed} kills ({mid} after the attempt had written rows) over {rounds} round(s), {lost} rows lost, {duplicated} duplicated, "
        f"equal to the uninterrupted run: {'yes' if unequal == 0 else 'NO'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suite.harness.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs inside a running matrix")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill delays (default: random)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    parser.add_argument("--reference", nargs=2, metavar=("DIR", "SECONDS"),
                        help="reuse an uninterrupted run of the same matrix by the same code, and its wall time")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"chaos: seed {seed}")
    ref = (Path(args.reference[0]), float(args.reference[1])) if args.reference else None
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        s = chaos(args.kills, seed, Path(args.keep), reference=ref)
    else:
        with tempfile.TemporaryDirectory(prefix="splitleak-chaos-") as work:
            s = chaos(args.kills, seed, Path(work), reference=ref)
    return 0 if s["lost"] == 0 and s["duplicated"] == 0 and s["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
