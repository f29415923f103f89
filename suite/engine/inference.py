"""The split generation loop: greedy decoding or sampling, one ``generation_step`` per token.

The client sends the prompt's head output once, then each sampled token's; the server answers every message
with its trunk's hidden states (keeping its own KV cache); the client's tail picks the next token. The loop
stops after ``new_tokens`` tokens, or at ``eos`` when one is given. The last sampled token's head output is
never sent: the server sees the prompt and every generated token but the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from suite.engine.decoding import ClientDecoder, TrunkDecoder
from suite.engine.step import generation_step
from suite.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """``temperature = 0``: greedy (the argmax, as ``generate(do_sample=False)``); otherwise sampling from the
    softmax at that temperature, restricted to the ``top_k`` most likely tokens (0: all) with a seeded
    generator of the client's own."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0:
            raise ConfigError("sampling: temperature and top_k must be >= 0 (temperature 0 is greedy decoding)")

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token [1, 1] from the tail's logits [1, V]."""
        if self.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        scores = logits.float() / self.temperature
        if self.top_k:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def generate(decoder: ClientDecoder, trunk: TrunkDecoder | None, prompt_ids: torch.Tensor, new_tokens: int,
             sampling: Sampling | None = None, step: int = 0, eos: int | None = None) -> tuple[torch.Tensor, int]:
    """Generate up to ``new_tokens`` tokens after ``prompt_ids`` ([1, P]) through the split. Returns the new
    tokens [1, N] and the next free protocol step (steps number the messages; each generation step is one)."""
    if new_tokens < 1:
        raise ConfigError(f"new_tokens must be >= 1, not {new_tokens}")
    sampling = sampling or Sampling()
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    decoder.start()
    out: list[torch.Tensor] = []
    logits = generation_step([decoder], trunk, step, [prompt_ids])[0]
    step += 1
    while True:
        token = sampling.pick(logits, generator)
        out.append(token)
        if len(out) == new_tokens or (eos is not None and int(token) == eos):
            break
        logits = generation_step([decoder], trunk, step, [token])[0]
        step += 1
    return torch.cat(out, 1), step
