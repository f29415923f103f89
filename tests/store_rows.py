"""The rows two runs of the same matrix must agree on (shared by the executor tests)."""

from suite.store import ResultsStore, comparable


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
