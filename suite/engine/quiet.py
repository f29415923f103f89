"""Keep the command line's output to what a user needs: library deprecation notices and advisory warnings are
silenced in the CLI process and in every worker it starts (workers do not inherit warning filters)."""

from __future__ import annotations

import os
import warnings

LIBRARIES = r"(torch|transformers|peft|accelerate|ray|grpc|opacus|datasets|huggingface_hub)(\.|$)"


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    # Deprecations raised from a library's own call into torch are attributed to torch's frame; ignore those
    # that name a library API (a user's own deprecations still show).
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in version", category=FutureWarning)
    # Opacus' per-example hooks (dp_sgd) are full backward hooks; on a client head, whose inputs are token ids,
    # torch warns that they fire on the outputs' gradients only, which is all Opacus needs. The warning is
    # attributed to the caller's ``backward()`` frame, not torch's, so it is matched by its message.
    warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients are computed with respect "
                            r"to module outputs since no inputs require gradients", category=UserWarning)
