"""Device-name syntax, without torch: the config validates names with it before anything heavy is imported."""

from __future__ import annotations

import re

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """Syntax only (config validation, no torch): 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', not {name!r}")
    return name
