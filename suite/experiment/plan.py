"""The plan of a matrix: model × split × threat × attack × defense (× the swept training axes), expanded once
into cells, each with its one label and its key.

Sweeps (a list-valued attack or defense parameter, ``[matrix] steps / finetune / seeds``) expand here and
nowhere else. Cells whose attack needs more than the threat grants, or that a ``[matrix] skip`` rule names,
are left out (and listed with the reason). The key hashes a cell's config, the model revision, the seed and
the code revision, so a killed run resumes where it stopped; ``row`` is the part of a results row that says
which cell it is. Running a group of cells is ``suite.experiment.run``; scheduling the groups,
``suite.experiment.schedule``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.config import ExperimentConfig
from suite.experiment.revision import code_revision, key_part
from suite.experiment.store import cell_label
from suite.interfaces.attack import ATTACKS, make_attack
from suite.interfaces.defense import DEFENSES, make_defense
from suite.interfaces.presets import THREATS, Capability, colluder_problem, get_threat, stage_problem


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


# The training axes a cell may override: its [training] key -> the [matrix] list that sweeps it. A new axis is
# an entry here, a field of ``Cell`` and its list in ``suite.experiment.config.MatrixSection``.
AXES = {"steps": "steps", "finetune": "finetune", "seed": "seeds"}
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
    mode: str | None = None  # None: training; "inference": the trained split serving prompts

    @property
    def spec(self) -> SplitSpec:
        return SplitSpec(self.head_blocks, self.tail_blocks)

    def axes(self) -> dict[str, Any]:
        """The training axes this cell sets (its sweeps), by [training] key."""
        return {k: getattr(self, k) for k in AXES if getattr(self, k) is not None}

    def label(self) -> str:
        """The cell's one label (``suite.experiment.store.cell_label``, which the gate and the report read
        back from its row): no two cells of a matrix share it."""
        return cell_label({**self.__dict__, "axes": self.axes()})

    def training_group(self) -> tuple:
        """Cells with the same group share one training run (and, but for a wire_only defense's frames, one
        capture)."""
        active = ATTACKS.get(self.attack).active
        defense, params = self.defense, self.defense_params
        if SHARE_WIRE_ONLY_TRAINING and DEFENSES.get(defense).wire_only:
            defense, params = "none", "{}"
        return (self.head_blocks, self.tail_blocks, defense, params, *(getattr(self, k) for k in AXES),
                (self.threat, self.attack, self.attack_params) if active else None)

    def without_seed(self) -> Cell:
        return dataclasses.replace(self, seed=None)


def cell_config(cfg: ExperimentConfig, cell: Cell) -> ExperimentConfig:
    """``cfg`` with the cell's training axes (steps, finetune, seed) in [training]."""
    update = cell.axes()
    if not update:
        return cfg
    return cfg.model_copy(update={"training": cfg.training.model_copy(update=update)})


def _canon(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def validate_matrix(cfg: ExperimentConfig) -> None:
    """Every name and parameter in [matrix] exists; errors name the entry."""
    m = cfg.matrix
    threat_names(cfg)
    _entries(cfg)
    for k in m.splits:
        if k + m.tail_blocks < 0:
            raise ConfigError(f"matrix.splits: {k} is not a valid head block count")


def threat_names(cfg: ExperimentConfig) -> list[str]:
    """``[matrix] threats`` as threat names, a stage threat's table expanded over its ``stage`` list
    (``{ name = "curious_stage", stage = [0, 1] }`` -> ``curious_stage:0``, ``curious_stage:1``; a
    ``colluding_stages`` index pair is a string, ``stage = ["0,1", "0,2"]``); errors name the entry."""
    out: list[str] = []
    for i, entry in enumerate(cfg.matrix.threats):
        where = f"matrix.threats[{i}]"
        if isinstance(entry, dict):
            if set(entry) - {"name", "stage"} or not isinstance(entry.get("name"), str) or "stage" not in entry:
                raise ConfigError(f"{where}: a threat given as a table takes 'name' and 'stage' (a stage threat's "
                                  f"index, or a list to sweep), not {sorted(entry)}")
            values = entry["stage"] if isinstance(entry["stage"], list) else [entry["stage"]]
            names = [f"{entry['name']}:{v}" for v in values]
        else:
            names = [entry]
        for name in names:
            try:
                threat = get_threat(name)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            problem = stage_problem(threat, cfg.training.stages)
            if problem and threat.stages:
                raise ConfigError(f"{where}: {problem}")
            if threat.name in out:
                raise ConfigError(f"{where}: threat {threat.name} is listed twice")
            out.append(threat.name)
    return out


def _check_attack(name: str, params: dict[str, Any]) -> None:
    cls = ATTACKS.get(name)
    fits = [t for t in THREATS.values() if not cls.missing_for(t)]
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
               dparams: dict, split: int | None = None) -> int | None:
    """The index of the first ``[matrix] skip`` rule the cell matches, or None. A rule's threat, attack,
    defense or split given as a list matches any of its values."""
    have = {"threat": threat, "attack": attack, "defense": defense, "split": split}
    for i, rule in enumerate(rules):
        names = all(have[k] in v if isinstance(v, list) else have[k] == v for k, v in rule.items() if k in have)
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
    axes = [dict(zip(AXES, values, strict=True))
            for values in itertools.product(*(getattr(m, sweep) or [None] for sweep in AXES.values()))]
    cells, skipped = [], []
    for mode in m.mode:
        for cell, why in _expand_mode(cfg, attacks, defenses, axes, None if mode == "training" else mode):
            (cells.append(cell) if why is None else skipped.append((cell, why)))
    return cells, skipped


def _expand_mode(cfg: ExperimentConfig, attacks, defenses, axes, mode: str | None):
    """(cell, None) for every cell of one mode, (cell, why) for each left out."""
    m = cfg.matrix
    for k in m.splits:
        for threat_name in threat_names(cfg):
            threat = get_threat(threat_name)
            for attack, aparams in attacks:
                missing = ATTACKS.get(attack).missing_for(threat)
                too_few = (colluder_problem(threat, cfg.training.clients) or stage_problem(threat, cfg.training.stages)
                           or ATTACKS.get(attack).threat_problem(threat))
                for defense, dparams in defenses:
                    for training in axes:
                        cell = Cell(k, m.tail_blocks, threat_name, attack, _canon(aparams), defense, _canon(dparams),
                                    **training, mode=mode)
                        rule = _skip_rule(m.skip, threat_name, attack, aparams, defense, dparams, k)
                        if too_few:
                            yield cell, too_few
                        elif missing:
                            yield cell, (f"{attack} needs {', '.join(sorted(c.value for c in missing))}; "
                                         f"{threat_name} does not grant it")
                        elif rule is not None:
                            yield cell, f"left out by matrix.skip[{rule}]"
                        else:
                            yield cell, mode_problem(attack, mode or "training")


def mode_problem(attack: str, mode: str) -> str | None:
    """Why ``attack`` has nothing to read in ``mode``, or None. Inference has no training-time signal (no
    gradients, no deviating server during training)."""
    cls = ATTACKS.get(attack)
    if mode not in cls.modes:
        return f"{attack} reads {' / '.join(sorted(cls.modes))} traffic, not {mode}"
    if mode == "inference":
        if cls.active or cls.kind != "inversion":
            return f"{attack} acts during training; inference cells run passive inversion attacks"
        if Capability.GRADIENTS in cls.requires:
            return f"{attack} needs gradients, a training-time signal that inference does not send"
    return None


def cell_key(cell: Cell, cfg: ExperimentConfig, revision: str, code: str | None = None) -> str:
    """Hash of everything that determines the cell's result: its own axes, the model revision, the data,
    the training setup and the seed, and (``code``: ``suite.experiment.revision.code_revision()``) the code that computes
    it. Without ``code`` it is the cell id, which rows of the same cell from other code share."""
    cfg = cell_config(cfg, cell)  # the axes enter through [training], so an unswept cell keeps its key
    payload = {
        # a training cell's key is what it was before inference cells existed
        "cell": {k: v for k, v in cell.__dict__.items() if k not in AXES and not (k == "mode" and v is None)},
        "model": cfg.model.name,
        "revision": revision,
        "data": cfg.data.model_dump(),
        # so do stages = 1 (the default) and a full_lr that trains nothing (unset, or no part trained in full):
        # every cell from before either keeps its key
        "training": cfg.training.model_dump(exclude={"head_blocks", "tail_blocks"}
                                            | ({"stages"} if cfg.training.stages == 1 else set())
                                            | ({"full_lr"} if not cfg.training.full_lr_used() else set())),
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


def cell_row(cell: Cell, key: str, cfg: ExperimentConfig, revision: str) -> dict[str, Any]:
    """The columns of ``cell``'s results row that say which cell it is and how it was computed; running
    the cell adds its metrics and status."""
    agg = aggregate_key(cell, cfg, revision, code_revision())
    cfg = cell_config(cfg, cell)
    return {
        "steps": cfg.training.steps, "finetune": cfg.training.finetune, "aggregate_key": agg,
        "key": key, "model": cfg.model.name, "revision": revision, "head_blocks": cell.head_blocks,
        "tail_blocks": cell.tail_blocks, "strategy": cfg.training.strategy, "threat": cell.threat,
        "attack": cell.attack, "attack_params": json.loads(cell.attack_params), "defense": cell.defense,
        "defense_params": json.loads(cell.defense_params), "seed": cfg.training.seed,
        "config": cfg.model_dump(), "versions": versions(),
        "code_revision": code_revision(), "cell_id": cell_key(cell, cfg, revision), "axes": cell.axes() or None,
        **stage_columns(cell, cfg),
        "mode": cell.mode or "training",
    }


def stage_columns(cell: Cell, cfg: ExperimentConfig) -> dict[str, Any]:
    """``stages`` (S), and a stage threat's ``stage`` ("1", "0,2"); running the cell adds ``stage_block`` (the
    first block whose input the earliest of its stages sees, known once the model is loaded)."""
    threat = get_threat(cell.threat)
    return {"stages": cfg.training.stages, "stage": ",".join(map(str, threat.stages)) if threat.stages else None}


def observation_key(cell: Cell, clients: int) -> tuple | None:
    """Two passive cells of one training group with equal keys hand their attack the same observations:
    the same victims and every granted capability except control of the server, which a passive attack
    never exercises (e.g. ``curious_server`` and ``malicious_server``). Such a cell is computed once and its
    row says so. Active attacks train their own group and get ``None``."""
    if ATTACKS.get(cell.attack).active:
        return None
    threat = get_threat(cell.threat)
    victims = tuple(c for c in range(clients) if c != threat.colluder) or (0,)
    # a stage threat sees its stages' inboxes, not the whole server's: its stages are part of the view
    return (cell.attack, cell.attack_params, victims, threat.grants - {Capability.CONTROL_SERVER},
            bool(threat.stage_params), threat.stages, cell.mode)
