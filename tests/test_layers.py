"""Imports point one way, and there is no import cycle anywhere in the project, also inside a layer.

Every ``import`` and ``from ... import`` in suite/, attacks/, defenses/ and reports/ (module level, inside a
function, or under ``TYPE_CHECKING``) is an edge from one module to another; importing ``a.b.c`` also
imports the packages ``a`` and ``a.b``. Each edge is checked against the allowed arrows (``ALLOWED``), and
the whole graph is checked for cycles, so a lazy import against the arrows fails here as well as one that
would form a cycle at import time.

The layers, bottom up: the base modules (``suite``, ``suite.errors``, ``suite.registry``); scoring and the
engine; the interfaces; the experiment; the network parties; the harnesses; the command line. ``attacks/``
and ``defenses/`` sit on the interfaces and never import each other; ``reports/`` reads only the results
store, the scoring and the public threat presets, and imports no torch (``test_results_and_report_import_no_torch``).

When this test was written it found two cycles, ``suite.experiment.matrix`` <-> ``cell`` <->
``preflight`` and ``suite.harness.bench`` <-> ``net_bench``, and the experiment importing ``reports.metrics``
and ``reports.intervals`` and the report importing ``suite.interfaces.threats`` (torch)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("suite", "attacks", "defenses", "reports")
BASE = ("suite", "suite.errors", "suite.registry")  # modules, not prefixes: "suite" alone is its __init__
LAYERS = ("suite.scoring", "suite.engine", "suite.interfaces", "suite.experiment", "suite.net", "suite.harness",
          "suite.cli", "attacks", "defenses", "reports")
_SUITE = ("suite.base", "suite.scoring", "suite.engine", "suite.interfaces", "suite.experiment", "suite.net",
          "suite.harness")
# layer -> the layers (or single modules) it may import besides its own modules
ALLOWED: dict[str, tuple[str, ...]] = {
    "suite.base": (),
    "suite.scoring": ("suite.base",),
    "suite.engine": ("suite.base",),
    "suite.interfaces": ("suite.base", "suite.engine"),
    "suite.experiment": ("suite.base", "suite.scoring", "suite.engine", "suite.interfaces"),
    "suite.net": ("suite.base", "suite.scoring", "suite.engine", "suite.interfaces", "suite.experiment"),
    "suite.harness": ("suite.base", "suite.scoring", "suite.engine", "suite.interfaces", "suite.experiment",
                      "suite.net"),
    # the command line is the one place above the reports: `run` builds the PDF, `check` runs the gate
    "suite.cli": (*_SUITE, "reports"),
    # an attack scores its own choices with the project's one token accuracy (suite.scoring.metrics)
    "attacks": ("suite.base", "suite.scoring", "suite.engine", "suite.interfaces"),
    "defenses": ("suite.base", "suite.engine", "suite.interfaces"),
    # the store, the scoring and the public threat presets (data): no torch behind `results` and `report`
    "reports": ("suite.base", "suite.scoring", "suite.experiment.store", "suite.interfaces.presets"),
}


def layer(module: str) -> str | None:
    if module in BASE:
        return "suite.base"
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name ``path`` imports: ``from a.b import c`` gives ``a.b`` and ``a.b.c``; relative
    imports are resolved against ``module``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            out += [source] + [f"{source}.{a.name}" for a in node.names]
    return out


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (the longest project module each imported name falls in,
    and the packages above it, which Python imports first)."""
    modules = project_modules(root, packages)
    graph: dict[str, set[str]] = {}
    for me, path in modules.items():
        targets: set[str] = set()
        for name in _imported_names(me, path):
            parts = name.split(".")
            hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)
            if hit is None:
                continue
            hit_parts = hit.split(".")
            targets |= {".".join(hit_parts[:i]) for i in range(1, len(hit_parts) + 1)}
        graph[me] = targets - {me}
    for me in graph:  # a module's own packages are imported before it
        parts = me.split(".")
        graph[me] |= {".".join(parts[:i]) for i in range(1, len(parts))} - {me}
    return graph


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Edges that leave the importer's layer for one it may not import."""
    wrong = []
    for me, targets in sorted(graph.items()):
        mine = layer(me)
        for target in sorted(targets):
            theirs = layer(target)
            if theirs == mine or theirs is None:
                continue
            allowed = ALLOWED.get(mine, ())
            if theirs in allowed or any(target == a or target.startswith(a + ".") or a.startswith(target + ".")
                                        for a in allowed):  # (a package above an allowed module: its __init__)
                continue
            wrong.append(f"{me} ({mine}) imports {target} ({theirs})")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_import_follows_the_allowed_arrows():
    graph = import_graph()
    assert all(layer(m) for m in graph), [m for m in graph if not layer(m)]
    assert not wrong_arrows(graph)


def test_no_import_cycles_anywhere():
    assert not cycles(import_graph())


@pytest.mark.parametrize("command", ["results", "report"])
def test_results_and_report_import_no_torch(command, tmp_path):
    """`splitleak results` prints a table and `splitleak report` builds the PDF from the store alone: neither
    loads torch (nor the engine behind it)."""
    from synthetic_store import sweep_rows, write_store

    store = write_store(tmp_path / "run", sweep_rows())
    code = (f"import sys; from suite.cli import main; rc = main([{command!r}, {str(store)!r}]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH'); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO TORCH"


def test_suite_top_level_holds_only_the_base_modules_and_subpackages():
    loose = sorted(p.name for p in (ROOT / "suite").glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "errors.py", "registry.py"]


# --- the checker catches what it is meant to catch -------------------------------------------------


@pytest.mark.parametrize("edge", [
    ("suite.engine.split", "suite.experiment.config"),  # upwards
    ("suite.engine.split", "reports.tables"),  # the engine into the reports
    ("attacks.fsha", "defenses.dp"),  # plug-ins into each other
    ("attacks.fsha", "suite.cli"),  # an attack into the command line
    ("reports.tables", "suite.engine.split"),  # the reports into the engine (torch)
    ("reports.report", "suite.interfaces.threats"),
    ("suite.experiment.store", "suite.net.link"),
])
def test_a_planted_bad_edge_is_caught(edge):
    graph = {k: set(v) for k, v in import_graph().items()}
    src, dst = edge
    graph.setdefault(src, set()).add(dst)
    assert any(line.startswith(f"{src} ") and f" imports {dst} " in line for line in wrong_arrows(graph))


def test_a_planted_cycle_inside_a_layer_is_caught():
    graph = {k: set(v) for k, v in import_graph().items()}
    graph["suite.engine.split"].add("suite.engine.training")  # training imports split: a cycle in one layer
    assert not wrong_arrows(graph)  # the arrows alone would let it pass
    assert ["suite.engine.split", "suite.engine.training"] in [[m for m in c if m in ("suite.engine.split",
                                                                                       "suite.engine.training")]
                                                                for c in cycles(graph)]


def test_a_planted_package_fails_both_checks(tmp_path):
    """A package on disk with a lazy upward import and a same-layer cycle through a relative import."""
    (tmp_path / "suite" / "engine").mkdir(parents=True)
    (tmp_path / "suite" / "experiment").mkdir()
    for pkg in ("suite", "suite/engine", "suite/experiment"):
        (tmp_path / pkg / "__init__.py").write_text('"""x"""\n')
    (tmp_path / "suite" / "errors.py").write_text("")
    (tmp_path / "suite" / "engine" / "a.py").write_text("from .b import thing\n")
    (tmp_path / "suite" / "engine" / "b.py").write_text(
        "from suite.engine import a\n\ndef f():\n    from suite.experiment.run import go\n")
    (tmp_path / "suite" / "experiment" / "run.py").write_text("from suite.errors import X\n")
    graph = import_graph(tmp_path, ("suite",))
    assert graph["suite.engine.a"] >= {"suite.engine.b", "suite", "suite.engine"}
    assert wrong_arrows(graph) == ["suite.engine.b (suite.engine) imports suite.experiment "
                                   "(suite.experiment)",
                                   "suite.engine.b (suite.engine) imports suite.experiment.run "
                                   "(suite.experiment)"]
    assert cycles(graph) == [["suite.engine.a", "suite.engine.b"]]
