"""Every attack declares what it reads: the runner hands an attack only ``grants ∩ (requires | uses)``, so an
observation field read but not declared is silently None and the attack runs weaker than it is (prefix
inversion lost its shadow-text proposer this way: 0.84 instead of ≥ 0.99 at k = 8). Checked statically over
the attack's module and every ``attacks.toolkit`` helper it imports, directly or through another helper."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import attacks  # noqa: F401  (registers the attacks)
from suite.interfaces.attack import ATTACKS
from suite.interfaces.threats import Capability as C

ROOT = Path(__file__).resolve().parent.parent / "attacks"
FIELD = {"batches": C.ACTIVATIONS, "frames": C.WIRE, "base_model": C.BASE_WEIGHTS, "shadow": C.SHADOW_DATA,
         "colluder_head_tail": C.COLLUDER_WEIGHTS, "colluder_records": C.COLLUDER_DATA}

# Fields an attack fills itself: wire_inversion parses activations (and gradients) off the plaintext wire and
# hands its inner attacks a view with ``batches`` built from those frames, never the runner's.
DERIVED = {"wire_inversion": {"batches"}}
# Fields behind a branch the attack never takes: kv_inversion runs ``prefix_invert`` on its own readout with
# ``use_colluder=False``, so the colluder paths the static walk reaches (``reference_parts``, ``training_pairs``)
# are not run; ``tests/test_inference.py`` runs it under the threat that grants it (no colluder).
NOT_TAKEN = {"kv_inversion": {"colluder_head_tail", "colluder_records"}}


def _module_index(path: Path) -> tuple[dict[str, ast.AST], dict[str, tuple[Path, str]]]:
    """Top-level definitions of a module by name, and the names it imports from ``attacks.toolkit`` modules."""
    tree = ast.parse(path.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attacks.toolkit."):
            for alias in node.names:
                imported[alias.asname or alias.name] = (ROOT.joinpath(*node.module.split(".")[1:]).with_suffix(".py"),
                                                        alias.name)
    return defs, imported


def _read_fields(path: Path, name: str | None = None, seen: set | None = None) -> set[str]:
    """Observation fields read by ``name`` in ``path`` (the whole module when None), following the module's
    own top-level functions and the helper functions it imports, transitively."""
    seen = set() if seen is None else seen
    if (path, name) in seen:
        return set()
    seen.add((path, name))
    defs, imported = _module_index(path)
    nodes = [ast.parse(path.read_text())] if name is None else [defs[name]] if name in defs else []
    out: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Attribute) and sub.attr in FIELD and isinstance(sub.value, ast.Name)
                    and sub.value.id == "obs"):
                out.add(sub.attr)
            elif isinstance(sub, ast.Name) and sub.id in imported:
                out |= _read_fields(*imported[sub.id], seen)
            elif name is not None and isinstance(sub, ast.Name) and sub.id in defs and sub.id != name:
                out |= _read_fields(path, sub.id, seen)
    return out


@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
def test_attack_declares_every_observation_it_reads(name):
    cls = ATTACKS.get(name)
    path = Path(importlib.import_module(cls.__module__).__file__)
    missing = {f: FIELD[f].value for f in _read_fields(path) - DERIVED.get(name, set()) - NOT_TAKEN.get(name, set())
               if FIELD[f] not in cls.capabilities()}
    assert not missing, f"{name} reads {missing} but declares neither in requires nor in uses"
