"""Commitments to the server trunk's state, for audits that need no access to the live trunk.

With ``Server.commit_state`` on, the server hashes the state its trunk computes a step with — a digest of its
frozen weights (fixed, computed once) and the bytes of every trainable tensor (LoRA adapters, or every weight
under full fine-tuning) — and sends the 32-byte digest with the hidden states of that step
(``ActivationMsg.commitment``). The client keeps it. For a step it audits, the client asks for the state
(``Server.reveal``: safetensors bytes, what would cross the wire), recomputes the digest over the revealed
tensors and its own replica's frozen weights, and only then re-executes the trunk with them. A server that
computes with other weights than it committed to, or reveals other weights than it committed to, is caught
by one of the two checks; the client never reads the server's objects.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from suite.errors import ProtocolError


def _update(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _is_state(name: str, p: nn.Parameter) -> bool:
    """Trainable now, or an adapter weight (per-client adapters are frozen while another client's is active)."""
    return p.requires_grad or "lora_" in name


def for_adapter(names, adapter: str | None) -> set[str]:
    """The state names a pass with ``adapter`` active computes with (per-client adapters: this adapter set
    only, never another client's; shared adapters, ``adapter`` None: all of them)."""
    return {n for n in names if adapter is None or "lora_" not in n or f".{adapter}." in n}


def frozen_digest(module: nn.Module) -> bytes:
    """sha256 over the names and bytes of the module's frozen parameters (the public base weights)."""
    h = hashlib.sha256(b"splitleak-frozen-v1")
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if not _is_state(name, p):
            _update(h, name, p)
    return h.digest()


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable and adapter parameters by name: what a step's commitment covers besides the
    frozen digest."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if _is_state(n, p)}


def state_names(module: nn.Module) -> set[str]:
    """The names ``trainable_state`` covers: all a reveal may (and must) carry, before ``for_adapter``."""
    return {n for n, p in module.named_parameters() if _is_state(n, p)}


def commit(frozen: bytes, state: dict[str, torch.Tensor], adapter: str | None) -> bytes:
    h = hashlib.sha256(b"splitleak-commit-v1" + frozen + f"|adapter={adapter}|".encode())
    for name in sorted(state):
        _update(h, name, state[name])
    return h.digest()


def digest_tensor(digest: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()


def tensor_digest(t: torch.Tensor | None) -> bytes | None:
    return None if t is None else bytes(t.to(torch.uint8).tolist())


def encode_reveal(state: dict[str, torch.Tensor], adapter: str | None) -> bytes:
    return st_save({k: v.contiguous() for k, v in state.items()}, metadata={"adapter": adapter or ""})


def decode_reveal(data: bytes) -> tuple[dict[str, torch.Tensor], str | None]:
    import json
    import struct

    try:
        state = st_load(bytes(data))
        n = struct.unpack("<Q", data[:8])[0]
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    except Exception as err:
        raise ProtocolError(f"malformed state reveal: {err}") from None
    return state, (meta.get("adapter") or None)
