"""Re-deciding tokens with what follows them: the first positions (a deep head's output there sits in the
attention-sink dimensions and barely depends on its own token) and near-ties (a runner-up within a margin of
the choice). Every later output attends to the token, so the summed match of a window after it decides."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from attacks.toolkit.observe import token_embeddings
from attacks.toolkit.prefix.scorer import Scorer
from attacks.toolkit.prefix.search import select
from suite.engine.split import ClientHead, position_ids_for


def window_score(head: ClientHead, scorer: Scorer, target: torch.Tensor, mask: torch.Tensor,
                 seqs: torch.Tensor, inputs_embeds: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Summed score [N] of the head's outputs for ``seqs`` [N, W] against ``target`` [N, W, H] over the
    window's real positions from ``start`` on (``mask`` [N, W])."""
    out = head(seqs, mask, position_ids_for(mask), inputs_embeds=inputs_embeds).float()
    return (scorer.score_positions(target, out) * mask)[:, start:].sum(1)


def first_candidates(head: ClientHead, scorer: Scorer, target: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                     k: int, window: int = 8, t: int = 0) -> torch.Tensor:
    """Whole-vocabulary candidates [N, k] for token ``t`` (the first, by default), ranked by what follows it:
    the gradient of the summed score of positions ``t..t+window-1`` (the recovered tokens around it) with
    respect to token ``t``'s input embedding ranks every vocabulary row by its first-order gain ``g · E_v``.
    The first outputs of a deep head barely depend on their own token (the attention sink), but every later
    output attends to it."""
    width = min(t + window, ids.shape[1])
    seqs, m = ids[:, :width], mask[:, :width]
    table = token_embeddings(head)
    with torch.enable_grad():
        emb = head.embed(seqs).detach().float().requires_grad_(True)
        x = emb if head.pos_embed is None else emb + head.pos_embed(position_ids_for(m))
        score = window_score(head, scorer, target[:, :width], m, seqs, x, start=t).sum()
        (grad,) = torch.autograd.grad(score, emb)
    gain = grad[:, t] @ table.T  # [N, V]
    return gain.topk(min(k, table.shape[0]), dim=-1).indices


@torch.no_grad()
def window_totals(head: ClientHead, scorer: Scorer, target: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                  cand: torch.Tensor, t: int, window: int = 8, chunk: int = 256, cached: bool = True) -> torch.Tensor:
    """Summed score [N, C] over positions ``t..t+window-1`` of ``ids`` [N, T] with token ``t`` replaced by each
    of ``cand`` [N, C]. ``cached``: the shared prefix ``0..t-1`` of each row runs through the head once (a KV
    cache every candidate reads) and only the window runs per candidate; the same figures as the full
    forward (``cached=False``), at a fraction of the cost for ``t > 0``."""
    n, c = cand.shape
    width = min(t + window, ids.shape[1])
    rows = torch.arange(n).repeat_interleave(c)
    seqs = ids[rows, :width].clone()
    seqs[:, t] = cand.reshape(-1)
    m = mask[rows, :width]
    prefix = None
    if cached and t > 0:  # rows with position t real have every earlier position real (right padding)
        prefix = DynamicCache(config=head.blocks.config)
        head(ids[:, :t], torch.ones(n, t, dtype=torch.long), position_ids_for(ids[:, :t]), cache=prefix)
    pos = torch.arange(t, width)
    total = torch.empty(rows.shape[0])
    for lo in range(0, rows.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        if prefix is None:
            total[sl] = window_score(head, scorer, target[rows[sl], :width], m[sl], seqs[sl], start=t)
            continue
        out = head(seqs[sl, t:], m[sl], pos.expand(seqs[sl].shape[0], -1), cache=select(prefix, rows[sl])).float()
        total[sl] = (scorer.score(target[rows[sl], t:width], out) * m[sl, t:]).sum(1)
    return total.view(n, c)


@torch.no_grad()
def refine_first(head: ClientHead, scorer: Scorer, target: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                 cand: torch.Tensor, bonus: torch.Tensor | None = None, window: int = 8,
                 chunk: int = 256, t: int = 0) -> tuple[torch.Tensor, int]:
    """Re-decide token ``t`` (the first, by default) with what follows it. At the first positions a deep
    head's output sits in the attention-sink dimensions and barely depends on the token, so they are the ones
    the position-by-position search gets wrong most. Every candidate ``cand`` [N, C] for it is scored with the
    recovered tokens around it, summed over positions ``t..t+window-1`` (every later output attends to token
    ``t``). ``bonus`` [N, T, V]: other evidence for each token (``bisr``'s), added at ``t`` as in the search.
    Returns the ids with the best token ``t`` and how many changed."""
    n = cand.shape[0]
    cand = torch.cat([ids[:, t : t + 1], cand], 1)  # the current choice first: ties keep it
    total = window_totals(head, scorer, target, mask, ids, cand, t, window, chunk)
    if bonus is not None:
        total = total + bonus[:, t].gather(1, cand)
    best = total.argmax(1)
    new = ids.clone()
    new[:, t] = cand[torch.arange(n), best]
    return new, int((new[:, t] != ids[:, t]).sum())


@torch.no_grad()
def refine_ties(head: ClientHead, scorer: Scorer, target: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                alternatives: tuple[torch.Tensor, torch.Tensor], margin: float, bonus: torch.Tensor | None = None,
                window: int = 4, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """Re-decide near-ties with what follows them. Where a runner-up's own score came within ``margin`` of the
    chosen token's (inflections such as ``supports`` / `` supporting`` match one position almost equally), the
    outputs after it tell them apart: every later output attends to it. Left to right from position 1, each
    near-tie's candidates are scored by the summed match of the ``window`` positions from it on, with the
    recovered continuation after it (``bonus`` [N, T, V], other evidence for the token, added as in the
    search); the best replaces the choice, ties keep it. ``alternatives``: ``PrefixSearch.alternatives``.
    Returns the ids and how many tokens changed."""
    alt_ids, alt_s = alternatives
    length = ids.shape[1]
    ids = ids.clone()
    real = mask.bool()
    changed = 0
    for t in range(1, length):
        chosen = alt_s[:, t].max(1).values
        near = real[:, t, None] & (alt_s[:, t] >= chosen[:, None] - margin) & (alt_ids[:, t] != ids[:, t, None])
        rows = near.any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        # Runner-ups outside the margin stand in as the current choice: refine_first keeps it on a tie.
        cand = torch.where(near[rows], alt_ids[rows, t], ids[rows, t, None])
        new, n = refine_first(head, scorer, target[rows], mask[rows], ids[rows], cand,
                              None if bonus is None else bonus[rows], window, chunk, t=t)
        ids[rows] = new
        changed += n
    return ids, changed

