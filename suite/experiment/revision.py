"""The code revision that goes into result keys: a row computed by other code is not silently reused.

The key part is a hash of the source files of ``suite``, ``attacks``, ``defenses`` and ``reports`` (what
computes a result), so it is exact in a git checkout, an sdist or an installed wheel alike, and a commit that
only touches documentation keeps every row. The label adds the package version and, in a git checkout, the
commit (``+dirty`` when those folders differ from it), so a stale row says which code wrote it.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import suite

ROOT = Path(suite.__file__).resolve().parent.parent
PACKAGES = ("suite", "attacks", "defenses", "reports")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the relative paths and bytes of every .py/.toml file of the packages, in sorted order."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        base = ROOT / pkg
        files = sorted(f for f in base.rglob("*") if f.suffix in (".py", ".toml") and "__pycache__" not in f.parts)
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    """``<version>+src-<hash>`` and, in a git checkout of this source tree, ``@git-<commit>[+dirty]``."""
    label = f"{suite.__version__}+src-{source_hash()}"
    top = _git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == ROOT:
        commit = _git("rev-parse", "--short=12", "HEAD")
        if commit:
            dirty = _git("status", "--porcelain", "--", *PACKAGES)
            label += f"@git-{commit}" + ("+dirty" if dirty else "")
    return label


def key_part(revision: str) -> str:
    """What of a revision label enters a result key: the source hash only."""
    return revision.split("@", 1)[0].split("+src-", 1)[-1]
