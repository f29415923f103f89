"""Helpers shared by the attacks: stacking observations, the public base head, nearest-row decoding."""

from __future__ import annotations

import dataclasses

import torch

from suite.engine.split import ClientHead, position_ids_for, split_model
from suite.interfaces.threats import Observations


def stacked(obs: Observations) -> tuple[torch.Tensor, torch.Tensor]:
    """All observed head outputs as one [N, T, H] tensor (right-padded to the longest) and the [N, T] mask."""
    if not obs.batches:
        raise ValueError("no observed activations")
    length = max(b.hidden.shape[1] for b in obs.batches)
    hidden = torch.cat([torch.nn.functional.pad(b.hidden.float(), (0, 0, 0, length - b.hidden.shape[1]))
                        for b in obs.batches])
    mask = torch.cat([torch.nn.functional.pad(b.attention_mask, (0, length - b.attention_mask.shape[1]))
                      for b in obs.batches])
    return hidden, mask


def shared_base(obs: Observations) -> Observations:
    """``obs`` whose ``base_model()`` returns one frozen copy for the whole reconstruction instead of a fresh
    deep copy per call. For attacks whose every use of the base only reads it (split views, the LM prior;
    ``calibrate`` copies the head it tunes): bisr took five copies of the model, one per helper."""
    if obs.base_model is None:
        return obs
    made: list[torch.nn.Module] = []

    def once() -> torch.nn.Module:
        if not made:
            model = obs.base_model()
            model.requires_grad_(False)
            made.append(model.eval())
        return made[0]

    return dataclasses.replace(obs, base_model=once)


def public_head(obs: Observations) -> ClientHead:
    """The client head as the public base weights define it (before any fine-tuning), frozen, eval mode."""
    model = obs.base_model()
    model.requires_grad_(False)
    head = split_model(model, obs.spec).client_head
    return head.eval()


def token_embeddings(head: ClientHead) -> torch.Tensor:
    """[V, H] input embedding rows as the first block sees them, without position embeddings."""
    with torch.no_grad():
        return head.embed(torch.arange(head.embed.num_embeddings)).float()


def without_positions(head: ClientHead, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Remove learned absolute position embeddings (GPT-2) from an embedding-space vector."""
    if head.pos_embed is None:
        return hidden
    with torch.no_grad():
        return hidden - head.pos_embed(position_ids_for(mask)).float()


def nearest_rows(vectors: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each vector [..., H], the index of the row of ``table`` [V, H] with the highest cosine similarity."""
    flat = torch.nn.functional.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    rows = torch.nn.functional.normalize(table.float(), dim=-1)
    out = torch.empty(flat.shape[0], dtype=torch.long)
    for lo in range(0, flat.shape[0], chunk):
        out[lo : lo + chunk] = (flat[lo : lo + chunk] @ rows.T).argmax(-1)
    return out.reshape(vectors.shape[:-1])


def decode_rows(tokenizer, token_ids: torch.Tensor, mask: torch.Tensor) -> tuple[str, ...]:
    return tuple(tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(token_ids, mask,
                                                                                               strict=True))


@torch.no_grad()
def run_head(head: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``head``'s outputs [N, T, H] (fp32) on right-padded ``ids`` / ``mask``, ``chunk`` sequences at a time."""
    return torch.cat([head(ids[lo : lo + chunk], mask[lo : lo + chunk], position_ids_for(mask[lo : lo + chunk])).float()
                      for lo in range(0, ids.shape[0], chunk)])
