"""Held-out natural text for re-measuring attacks on text nobody developed them on: the opening paragraphs of
the docstrings of Python standard-library modules (English prose, another domain than examples/licenses.txt).

    python examples/heldout_text.py > /tmp/heldout.txt     # one paragraph per line (66 with Python 3.11)
    # the attack reads the first 16 (``"limit": 16``); the next 16 measure utility
"""

import importlib
import re
import sys

# Modules in sorted order, private and platform-specific ones left out (stable across machines and versions).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "msilib", "winreg", "winsound",
        "ensurepip", "venv", "lib2to3", "pydoc_data", "nt", "msvcrt", "_winapi"}


def paragraphs(limit: int = 96) -> list[str]:
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except Exception:  # noqa: BLE001  (a module this platform lacks)
            continue
        text = " ".join(re.sub(r"\s+", " ", p).strip() for p in doc.split("\n\n")[:2])
        if len(text.split()) >= 25:  # at least ~32 tokens of prose
            out.append(text)
        if len(out) == limit:
            break
    return out


if __name__ == "__main__":
    print("\n".join(paragraphs()))
