"""Nearest-embedding inversion (the baseline of Wan et al. 2024): decode each position of the observed head
output to the vocabulary row of the public input embedding with the highest cosine similarity.

No training. Exact at k = 0 (the head output *is* the embedding); at k >= 1 it measures how much of the
token identity survives in the residual stream unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.toolkit.decoding import nearest_rows
from attacks.toolkit.observe import decode_rows, public_head, stacked, token_embeddings, without_positions
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations


@dataclass(frozen=True)
class NearestEmbeddingConfig(AttackConfig):
    pass


@register_attack("nearest_embedding")
class NearestEmbeddingAttack(Attack):
    requires = frozenset({Capability.ACTIVATIONS, Capability.BASE_WEIGHTS})
    Config = NearestEmbeddingConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        hidden, mask = stacked(obs)
        head = public_head(obs)
        ids = nearest_rows(without_positions(head, hidden, mask), token_embeddings(head))
        return Reconstruction(ids, decode_rows(obs.tokenizer, ids, mask))
