"""Where each party computes and in which floating-point type: one place that turns names into torch objects.

``[model] device`` is the device of the clients (and of the whole run unless ``server_device`` says
otherwise); ``[model] server_device`` puts the server's trunk elsewhere in the same process (e.g. clients on
the CPU, trunk on ``cuda:1``). ``splitleak serve`` and ``splitleak client`` are separate processes and each
takes its own ``--device``. Tensors cross the wire as bytes either way: ``suite.engine.protocol.encode`` copies to
the host, ``decode`` places on the receiver's device.

``auto`` is the first CUDA device if one is visible (under Ray's ``gpus_per_task`` Ray sets
``CUDA_VISIBLE_DEVICES``, so ``cuda`` is the task's own GPU), else Apple's ``mps``, else the CPU. A device
named explicitly but absent is refused with one line naming the fix.
"""

from __future__ import annotations

import torch

from suite.engine.device_names import DEVICE_PATTERN, check_device_name  # noqa: F401 (torch-free syntax check)
from suite.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name``; an absent device raises ``ConfigError`` (one line, names the fix)."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else name
    try:
        check_device_name(name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' is not available on this machine; use --device cpu")
        return torch.device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.split(":")[1]) if ":" in name else 0
    if count == 0:
        raise ConfigError(f"device '{name}' is not available on this machine (no CUDA GPU visible); "
                          "use --device cpu or --device auto")
    if index >= count:
        raise ConfigError(f"device '{name}' is not available on this machine ({count} CUDA GPU"
                          f"{'s' if count != 1 else ''} visible: cuda:0..cuda:{count - 1}); use --device cuda:0")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype = "float32") -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ConfigError(f"dtype {name} is not supported; use float32, bfloat16 or float16")
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def module_device(module: torch.nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of a module's first parameter or buffer (``default`` for a module without any)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device(default)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings on an accelerator measure nothing without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_accelerator_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset (None elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
