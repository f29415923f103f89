"""Held-out natural text for re-measuring attacks on text nobody developed them on (English prose, other
domains than examples/data/licenses.txt), one paragraph per line:

    python examples/scripts/heldout_text.py > /tmp/heldout.txt            # standard-library docstrings (66 with 3.11)
    python examples/scripts/heldout_text.py metadata > /tmp/metadata.txt  # installed packages' descriptions
    python examples/scripts/heldout_text.py reference > /tmp/reference.txt  # the Python Language Reference's topics
    # the attack reads the first 16 (``"limit": 16``); the next 16 measure utility

``docstrings``: the opening paragraphs of the docstrings of Python standard-library modules. ``metadata``: the
first prose paragraph of each installed distribution's long description (its PyPI page), in name order;
markdown headings, badges, code and lists are skipped. ``reference``: the first prose paragraph of each topic
of the Python Language Reference that ships with the interpreter (``pydoc_data.topics``, what ``help("assert")``
prints), in topic order. Each source was first measured after the attacks' defaults were fixed: docstrings in
the session that added them, package descriptions a session later, the reference topics for Gemma 3's search
(fixed before that work began, sha256 of the output with Python 3.11.7 in BENCHMARKS.md).
"""

import importlib
import importlib.metadata
import pydoc_data.topics
import re
import sys

# Modules in sorted order, private and platform-specific ones left out (stable across machines and versions).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "msilib", "winreg", "winsound",
        "ensurepip", "venv", "lib2to3", "pydoc_data", "nt", "msvcrt", "_winapi"}
PROSE = re.compile(r"^[A-Z][^|<>`{}\[\]#*=]*$")  # starts like a sentence; no markup, tables or code
MIN_WORDS = 25  # at least ~32 tokens of prose


def docstrings(limit: int = 96) -> list[str]:
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except Exception:  # noqa: BLE001  (a module this platform lacks)
            continue
        text = " ".join(re.sub(r"\s+", " ", p).strip() for p in doc.split("\n\n")[:2])
        if len(text.split()) >= MIN_WORDS:
            out.append(text)
        if len(out) == limit:
            break
    return out


def metadata(limit: int = 96) -> list[str]:
    out, seen = [], set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        name = (dist.metadata["Name"] or "").lower()
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name in seen or not body:
            continue
        seen.add(name)
        for para in re.split(r"\n\s*\n", body):
            text = re.sub(r"\s+", " ", para).strip()
            if len(text.split()) >= MIN_WORDS and PROSE.match(text) and "http" not in text:
                out.append(text)
                break
        if len(out) == limit:
            break
    return out


def reference(limit: int = 96) -> list[str]:
    out = []
    for name in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            if para.startswith(" "):  # grammar rules and code examples are indented
                continue
            text = re.sub(r"\s+", " ", para).strip()
            if len(text.split()) >= MIN_WORDS and PROSE.match(text):
                out.append(text)
                break
        if len(out) == limit:
            break
    return out


SOURCES = {"docstrings": docstrings, "metadata": metadata, "reference": reference}

if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else "docstrings"
    if source not in SOURCES:
        sys.exit(f"heldout_text.py: unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    print("\n".join(SOURCES[source]()))
