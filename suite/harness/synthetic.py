"""What the benches feed the parties: a batch of random token ids (a fixed seed, so every variant timed side
by side gets the same batch). Shared by ``suite.harness.bench`` and ``suite.harness.net_bench``."""

from __future__ import annotations

import torch

from suite.engine.parties import Batch


def random_batch(vocab: int, batch_size: int, length: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    return Batch(ids, mask, ids.clone())
