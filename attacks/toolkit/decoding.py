"""Decoding a predicted vector to tokens: cosine similarity to the rows of an embedding table (the nearest
row, or the top ``k`` with their scores), and the public LM as a prior over the next token given the
recovered prefix (``LMPrior``: teacher-forced scores, a beam search over ``score + weight * log p_LM``).

The prior's weight is chosen on the attacker's simulated held-out shadow text (``choose_prior_weight``); 0
(no prior) is always a candidate, so adding it is never chosen where it hurts there.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from suite.scoring.metrics import token_accuracy

# Relative weights of the public LM's log-probability against the inverter's score, tried on the simulation.
PRIOR_WEIGHTS = (0.0, 0.003, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0)


def nearest_rows(vectors: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each vector [..., H], the index of the row of ``table`` [V, H] with the highest cosine similarity."""
    flat = F.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    rows = F.normalize(table.float(), dim=-1)
    out = torch.empty(flat.shape[0], dtype=torch.long)
    for lo in range(0, flat.shape[0], chunk):
        out[lo : lo + chunk] = (flat[lo : lo + chunk] @ rows.T).argmax(-1)
    return out.reshape(vectors.shape[:-1])


def cosine_topk(vectors: torch.Tensor, table: torch.Tensor, k: int, chunk: int | None = 512,
                unit_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For vectors [..., E]: the top-``k`` cosine similarities to the rows of ``table`` [V, E] and their row
    indices, each [..., k], ``chunk`` vectors at a time (None: all at once; never the full [..., V] for more).
    ``unit_rows``: the table's rows are already normalised (a caller decoding many batches normalises once)."""
    flat = F.normalize(vectors.reshape(-1, vectors.shape[-1]).float(), dim=-1)
    rows = table if unit_rows else F.normalize(table.float(), dim=-1)
    k = min(k, rows.shape[0])
    chunk = chunk or max(flat.shape[0], 1)
    vals = torch.empty(flat.shape[0], k)
    idx = torch.empty(flat.shape[0], k, dtype=torch.long)
    for lo in range(0, flat.shape[0], chunk):
        v, i = (flat[lo : lo + chunk] @ rows.T).topk(k, dim=-1)
        vals[lo : lo + chunk], idx[lo : lo + chunk] = v, i
    return vals.reshape(*vectors.shape[:-1], k), idx.reshape(*vectors.shape[:-1], k)


def top_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (scores, token ids) per position of full-vocabulary ``scores`` [N, T, V]."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1)


class LMPrior:
    """The public LM (the base model's full forward) as a prior over the next token given the prefix."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def teacher_forced(self, ids: torch.Tensor, mask: torch.Tensor, cand: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """[N, T, C]: log p_LM(cand[n, t, c] | ids[n, :t]) under the true prefix; 0 at position 0 (no prefix)."""
        out = torch.zeros(cand.shape, dtype=torch.float32)
        for lo in range(0, ids.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            logits = self.model(input_ids=ids[sl], attention_mask=mask[sl]).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            out[sl, 1:] = logp.gather(-1, cand[sl, 1:])
        return out

    @torch.no_grad()
    def beam(self, scores: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor, weight: float, width: int = 4,
             chunk: int = 16) -> torch.Tensor:
        """Beam search over ``sum_t scores[n, t, c_t] + weight * log p_LM(c_t | c_<t)``; ``cand`` [N, T, C] the
        candidate tokens per position, ``scores`` their (noise-aware) scores. Returns [N, T] token ids."""
        out = torch.empty(mask.shape, dtype=torch.long)
        for lo in range(0, mask.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            out[sl] = self._beam(scores[sl], cand[sl], mask[sl], weight, width)
        return out

    def step(self, ids: torch.Tensor, mask: torch.Tensor, cache):
        """One cached forward: (the grown KV cache, next-token logits [R, V]). transformers 5 names the cache
        argument and output ``cache`` (``past_key_values`` is deprecated); older releases only know the latter."""
        kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        res = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **({kw: cache} if cache is not None else {}))
        grown = res.cache if kw == "cache" else res.past_key_values
        return grown, res.logits[:, -1].float()

    def _beam(self, scores, cand, mask, weight, width):
        n, length, c = cand.shape
        b = min(width, c)
        real = mask.bool()
        # Position 0: no prefix, the inverter's scores alone.
        top, idx = scores[:, 0].topk(b, dim=-1)  # [n, b]
        total = top.clone()
        seqs = cand[:, 0].gather(-1, idx).unsqueeze(-1)  # [n, b, 1]
        flat = seqs.reshape(n * b, 1)
        cache, logits = self.step(flat, torch.ones_like(flat), None)
        rows = torch.arange(n).unsqueeze(-1)
        for t in range(1, length):
            logp = torch.log_softmax(logits, dim=-1).view(n, b, -1)  # [n, b, V]
            cand_t = cand[:, t]  # [n, c]
            lm = logp.gather(-1, cand_t.unsqueeze(1).expand(n, b, c))  # [n, b, c]
            step = scores[:, t].unsqueeze(1) + weight * lm  # [n, b, c]
            step = torch.where(real[:, t].view(n, 1, 1), step, torch.zeros_like(step))
            pad_row = ~real[:, t]
            cand_score = total.unsqueeze(-1) + step  # [n, b, c]
            if pad_row.any():  # past the end of a row: keep the beams as they are (first candidate, no score)
                keep = torch.full_like(cand_score, float("-inf"))
                keep[:, :, 0] = total
                cand_score = torch.where(pad_row.view(n, 1, 1), keep, cand_score)
            best, pick = cand_score.view(n, b * c).topk(b, dim=-1)  # [n, b]
            src, which = pick // c, pick % c
            token = cand_t.gather(-1, which)  # [n, b]
            seqs = torch.cat([seqs[rows, src], token.unsqueeze(-1)], -1)
            total = best
            order = (src + torch.arange(n).unsqueeze(-1) * b).reshape(-1)
            cache.reorder_cache(order)
            step_in = token.reshape(n * b, 1)
            am = torch.ones(n * b, t + 1, dtype=torch.long)
            cache, logits = self.step(step_in, am, cache)
        return seqs[:, 0]


def choose_prior_weight(prior: LMPrior, held_scores: torch.Tensor, held_cand: torch.Tensor, held_ids: torch.Tensor,
                        held_mask: torch.Tensor) -> tuple[float, dict[str, float]]:
    """The LM-prior weight with the best teacher-forced token accuracy on the simulated held-out shadow text
    (ties go to the smaller weight; 0 is a candidate, so adding the prior is never chosen when it hurts). A
    non-zero weight must beat no prior by a margin (1 % and two tokens), so selection noise on a small held-out
    set does not switch the prior on."""
    lm = prior.teacher_forced(held_ids, held_mask, held_cand)
    real = held_mask.bool()
    table: dict[str, float] = {}
    best_w, best_acc = 0.0, -1.0
    margin = max(0.01, 2.0 / max(int(real.sum()), 1))
    for w in PRIOR_WEIGHTS:
        pred = held_cand.gather(-1, (held_scores + w * lm).argmax(-1, keepdim=True)).squeeze(-1)
        acc = token_accuracy(held_ids, pred, held_mask) if real.any() else 0.0
        table[str(w)] = acc
        if acc > best_acc + (margin if w > 0 and best_w == 0 else 1e-9):
            best_w, best_acc = w, acc
    return best_w, table
