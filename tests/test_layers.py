"""The package layers import one way: errors/registry <- engine <- interfaces <- experiment <- net <- harness
<- cli; attacks/ and defenses/ never import each other; reports/ never imports the engine's internals.

Every ``import`` and ``from ... import`` in the source (module level or inside a function) is checked, so a
lazy import against the arrows fails here as well as one that would form a cycle at import time."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["suite.errors", "suite.registry", "suite.engine", "suite.interfaces", "suite.experiment", "suite.net",
         "suite.harness", "suite.cli"]
RANK = {name: i for i, name in enumerate(ORDER)}
RANK["suite.registry"] = RANK["suite.errors"]  # the two base modules sit on one level


def _layer(module: str) -> str | None:
    for name in sorted(RANK, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_suite_layers_import_downwards_only():
    wrong = []
    for path in sorted((ROOT / "suite").rglob("*.py")):
        me = _layer(_module(path))
        for target in _imports(path):
            them = _layer(target)
            if me and them and RANK[them] > RANK[me]:
                wrong.append(f"{_module(path)} imports {target}")
    assert not wrong, wrong


def test_plugins_and_reports_keep_their_side():
    wrong = []
    for pkg, banned in (("attacks", ("defenses",)), ("defenses", ("attacks",)),
                        ("reports", ("attacks", "defenses", "suite.engine", "suite.net", "suite.harness"))):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            wrong += [f"{_module(path)} imports {t}" for t in _imports(path)
                      if any(t == b or t.startswith(b + ".") for b in banned)]
    assert not wrong, wrong


def test_suite_top_level_holds_only_the_base_modules_and_subpackages():
    loose = sorted(p.name for p in (ROOT / "suite").glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "errors.py", "registry.py"]
