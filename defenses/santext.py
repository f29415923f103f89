"""SanText (Yue et al., 2021): metric local differential privacy on text by token replacement.

Every token x of a private record is replaced, on the client and before anything is computed, by a token y
drawn from the whole vocabulary with probability proportional to exp(-epsilon/2 * d(x, y)), d the Euclidean
distance between the rows of the public input-embedding table (the base model's, as published). The client
then trains on the sanitised record: its head sees the sanitised tokens and its tail's labels are the
sanitised tokens, so everything that leaves the client (activations, gradients) is a function of the
sanitised text only (post-processing). Each record is sanitised once and the same sanitised text is reused
every time the record is used (as SanText sanitises a dataset once), so repeated training steps do not
compose. Held-out evaluation sanitises the input the same way and scores the prediction of the true text.
Padding is never replaced.

Accounting: the mechanism is epsilon * d(x, x')-private per token (the exponential mechanism on a metric: the
ratio of the probabilities of any output under x and x' is at most exp(epsilon * d(x, x'))); with D the
diameter of the embedding table, each token is (epsilon * D)-LDP, and a record of n tokens is epsilon *
sum_i d(x_i, x'_i) <= n * epsilon * D by composition. The report gives epsilon per unit distance, an upper
bound on D (twice the largest row norm), the per-token and per-record bounds at the longest record sent, and
the measured fraction of tokens replaced. Randomness comes from each client's own ChaCha20 keystream keyed from
``os.urandom`` (``suite.engine.noise``: the server cannot regenerate it); ``seed`` is for tests and secret.

Attacker simulation: the mechanism is public (epsilon and the public table), so the attacker sanitises its own
shadow text the same way, with its own generator, and runs its head on that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from suite.engine.noise import NoiseStream, as_stream, client_stream
from suite.engine.parties import Batch
from suite.interfaces.defense import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class SanTextConfig(DefenseConfig):
    epsilon: float = 3.0  # privacy per token per unit of embedding distance (larger = fewer replacements)
    seed: int | None = None  # tests only; otherwise the OS CSPRNG seeds the sampling. Secret.

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")


@torch.no_grad()
def sanitise(ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, epsilon: float,
             source: NoiseStream | torch.Generator, chunk: int = 256) -> torch.Tensor:
    """Replace every real token of ``ids`` [N, T] by a draw from p(y | x) ∝ exp(-epsilon/2 · ‖E_x - E_y‖)."""
    stream = as_stream(source)
    out = ids.clone()
    real = mask.bool()
    tokens = ids[real]
    if tokens.numel() == 0:
        return out
    table = table.float()
    sq = table.pow(2).sum(-1)
    drawn = torch.empty_like(tokens)
    for lo in range(0, tokens.numel(), chunk):
        x = table[tokens[lo : lo + chunk]]
        dist = (x.pow(2).sum(-1, keepdim=True) + sq - 2 * x @ table.T).clamp_min(0).sqrt()
        probs = torch.softmax(-0.5 * epsilon * dist, dim=-1)
        drawn[lo : lo + chunk] = stream.categorical(probs).to(drawn.device)
    out[real] = drawn
    return out


@register_defense("santext")
class SanTextDefense(Defense):
    Config = SanTextConfig

    def __init__(self, config: SanTextConfig | None = None):
        super().__init__(config)
        self.replaced = 0
        self.tokens = 0
        self.longest = 0
        self.table_norm = 0.0

    def install(self, session) -> None:
        # The public table: the base model's input embeddings as published (read before any fine-tuning).
        table = session.clients[0].head.embed.weight.detach().clone()
        self.table_norm = float(table.float().norm(dim=-1).max())
        for client in session.clients:
            cache: dict[tuple[int, ...], torch.Tensor] = {}  # each record is sanitised once
            gen = client_stream(self.config.seed, client.id)  # each client its own stream

            def replace(batch: Batch, cache=cache, gen=gen) -> Batch:
                rows = []
                for row, m in zip(batch.input_ids, batch.attention_mask, strict=True):
                    key = tuple(row.tolist())
                    if key not in cache:
                        cache[key] = sanitise(row[None], m[None], table, self.config.epsilon, gen)[0]
                        real = m.bool()
                        self.replaced += int((cache[key][real] != row[real]).sum())
                        self.tokens += int(real.sum())
                        self.longest = max(self.longest, int(real.sum()))
                    rows.append(cache[key])
                ids = torch.stack(rows) if rows else batch.input_ids
                return Batch(ids, batch.attention_mask, ids.masked_fill(batch.attention_mask == 0, -100))

            client.token_hooks.append(replace)

    def report(self) -> dict:
        diameter = 2 * self.table_norm
        per_token = self.config.epsilon * diameter
        return {"epsilon_per_unit_distance": self.config.epsilon, "diameter_bound": diameter,
                "epsilon_per_token_bound": per_token, "epsilon_per_record_bound": per_token * self.longest,
                "tokens_per_record_max": self.longest,
                "replaced_fraction": self.replaced / self.tokens if self.tokens else None}

    def simulate_release(self, head, input_ids, attention_mask, generator):
        from suite.engine.split import position_ids_for

        with torch.no_grad():
            ids = sanitise(input_ids, attention_mask, head.embed.weight.detach(), self.config.epsilon, generator)
            return head(ids, attention_mask, position_ids_for(attention_mask))
