"""The rows two runs of the same matrix must agree on (shared by the executor tests)."""

from suite.experiment.store import ResultsStore, comparable


def _same(k, v):
    # Utility is a held-out loss over 64 sequences: a worker's or Ray task's thread count changes the float
    # summation order in its last bits, so utility columns are compared to 6 significant digits (and the
    # per-sequence scores under record_scores left out); every leakage column must match exactly.
    return float(f"{v:.6g}") if isinstance(v, float) and k.startswith(("utility", "perplexity")) else v


def comparable_rows(path):
    """A run's rows, less the package versions (which say nothing about the cells)."""
    with ResultsStore(path) as store:
        return [{k: _same(k, v) for k, v in r.items() if k not in ("versions", "record_scores")}
                for r in comparable(store.rows())]


def differences(a, b) -> list[str]:
    """'key column: a != b' for every cell and column where two runs' comparable rows differ (empty when equal):
    a failing executor test names the column instead of printing two long row lists."""
    left, right = {r["key"]: r for r in a}, {r["key"]: r for r in b}
    out = [f"{k}: only in the first run" for k in left.keys() - right.keys()]
    out += [f"{k}: only in the second run" for k in right.keys() - left.keys()]
    for k in sorted(left.keys() & right.keys()):
        x, y = left[k], right[k]
        out += [f"{k} {x.get('attack')}/{x.get('defense')} {c}: {x.get(c)!r} != {y.get(c)!r}"
                for c in sorted(x.keys() | y.keys()) if x.get(c) != y.get(c)]
    return out
