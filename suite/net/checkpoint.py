"""Atomic checkpoints of one party's trainable state (LoRA or full weights, optimiser state, step).

Written to a temporary file, flushed to disk and renamed over the old one, so a process killed at any
moment leaves either the previous checkpoint or the new one, never a torn file. The file is created 0600
(a client's weights were trained on its private data): readable by its owner only, whatever the umask. Loaded
with ``torch.load(weights_only=True)``: tensors, numbers and containers only, no code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suite.errors import SplitleakError


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``modules``, named ``<module>.<parameter>``."""
    return {f"{prefix}.{name}": p.detach().clone()
            for prefix, module in modules.items() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable(modules: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(modules)
    if set(expected) != set(state):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise SplitleakError(f"checkpoint does not match this model (missing {missing[:2]}, unexpected "
                             f"{extra[:2]}): was it written for another config? Delete it to start afresh")
    params = {f"{prefix}.{name}": p for prefix, module in modules.items() for name, p in module.named_parameters()}
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def party_state(trunk: nn.Module, optimizers: dict) -> dict[str, Any]:
    """A serving party's trunk weights and optimiser states (``optimizers``: key to optimiser or None)."""
    return {"weights": trainable_state({"trunk": trunk}),
            "optimizers": {str(k): opt.state_dict() for k, opt in optimizers.items() if opt is not None}}


def load_party(trunk: nn.Module, optimizers: dict, state: dict[str, Any]) -> None:
    """Put ``party_state``'s weights and optimiser states back."""
    load_trainable({"trunk": trunk}, state["weights"])
    for k, opt in optimizers.items():
        if opt is not None and str(k) in state["optimizers"]:
            opt.load_state_dict(state["optimizers"][str(k)])


def save(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover could have a wider mode: the file is always created afresh, 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")  # each party places it itself
    except Exception as err:  # a file that is not ours: say so, do not guess
        raise SplitleakError(f"cannot read checkpoint {path}: {type(err).__name__}; delete it to start afresh") from None
