"""``PrefixSearch``: the position-by-position search over a reference head (see ``attacks.toolkit.prefix``):
KV-cached incremental verification of every candidate, a beam, and widening where the proposer's candidates
all match poorly (gradient-ranked rounds over the whole vocabulary, SipIt's continuous step, the LM prior)."""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from attacks.toolkit.decoding import LMPrior
from attacks.toolkit.linear import LinearInverter
from attacks.toolkit.observe import token_embeddings
from attacks.toolkit.prefix.options import PrefixOptions, timed
from attacks.toolkit.prefix.scorer import Scorer
from suite.engine.split import ClientHead


def select(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache holding rows ``index`` of ``cache`` (the original is left untouched)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


class PrefixSearch:
    """Position-by-position search over a reference ``head`` (frozen, eval mode)."""

    def __init__(self, head: ClientHead, config, scorer: Scorer, options: PrefixOptions,
                 lm: torch.nn.Module | None = None, start_token: int | None = None):
        self.head, self.config, self.scorer, self.opt = head, config, scorer, options
        self.table = token_embeddings(head)  # [V, E] rows as the first block sees them (no positions)
        self.vocab = self.table.shape[0]
        self.stats = {"verified": 0, "widened_positions": 0, "positions": 0}
        self.seconds: dict[str, float] = defaultdict(float)  # wall seconds by phase: proposals, each widening kind
        # The public LM (full model) proposes the likely next tokens given each recovered prefix; it is read
        # after ``start_token`` (the document separator it was pre-trained with), so position 0 has a prior too.
        self.lm = lm if lm is not None and options.prior > 0 and start_token is not None else None
        self.start_token = start_token
        self._prior = None
        self._unit_table: torch.Tensor | None = None  # normalised rows, for the continuous step's nearest rows
        self._relax_lr = 0.0  # set with _unit_table: a tenth of the rows' per-coordinate spread
        # After ``run``: each position's best ``options.alternatives`` candidates [N, T, M] and their scores
        # (on the kept prefix), the runner-ups ``refine_ties`` re-decides near-ties among.
        self.alternatives: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- one incremental step ------------------------------------------------------------------------------

    def _step(self, cache: DynamicCache | None, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Head outputs at position ``t`` for ``tokens`` [R] appended to ``cache`` rows (one per token; the
        cache grows by one position). Returns [R, H]."""
        rows = tokens.shape[0]
        mask = torch.ones(rows, t + 1, dtype=torch.long)
        pos = torch.full((rows, 1), t, dtype=torch.long)
        return self.head(tokens[:, None], mask, pos, cache=cache)[:, 0].float()

    def _verify(self, cache: DynamicCache | None, rows: torch.Tensor, tokens: torch.Tensor, t: int,
                target: torch.Tensor) -> torch.Tensor:
        """Scores [R] of ``tokens`` [R] appended to the prefixes ``rows`` [R] (indices into ``cache``),
        against ``target`` [R, H]. Chunked; the cache is not modified."""
        out = torch.empty(tokens.shape[0])
        step = self.opt.chunk
        with torch.no_grad():
            for lo in range(0, tokens.shape[0], step):
                sub = select(cache, rows[lo : lo + step]) if cache is not None else self._fresh()
                h = self._step(sub, tokens[lo : lo + step], t)
                out[lo : lo + step] = self.scorer.score(target[lo : lo + step], h, first=t == 0)
        self.stats["verified"] += int(tokens.shape[0])
        return out

    def _fresh(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def _lm_step(self, cache, tokens: torch.Tensor, length: int):
        """The LM's (grown cache, next-token logits [R, V]) after appending ``tokens`` [R] to ``cache``'s rows,
        ``length`` tokens already cached."""
        if self._prior is None:
            self._prior = LMPrior(self.lm)
        with torch.no_grad():
            return self._prior.step(tokens[:, None], torch.ones(tokens.shape[0], length + 1, dtype=torch.long), cache)

    def _gradient(self, cache: DynamicCache, tokens: torch.Tensor, t: int, target: torch.Tensor) -> torch.Tensor:
        """d score / d (token embedding at ``t``) at ``tokens`` [R] (cache rows = prefixes, restored after)."""
        rows = tokens.shape[0]
        sub = select(cache, torch.arange(rows)) if cache is not None else self._fresh()
        pos = torch.full((rows, 1), t, dtype=torch.long)
        with torch.enable_grad():
            emb = self.head.embed(tokens[:, None]).detach().float().requires_grad_(True)
            x = emb if self.head.pos_embed is None else emb + self.head.pos_embed(pos)
            mask = torch.ones(rows, t + 1, dtype=torch.long)
            h = self.head(tokens[:, None], mask, pos, inputs_embeds=x, cache=sub)[:, 0]
            score = self.scorer.score(target, h, first=t == 0).sum()
            (grad,) = torch.autograd.grad(score, emb)
        return grad[:, 0]

    def _relax(self, cache: DynamicCache | None, tokens: torch.Tensor, t: int, target: torch.Tensor) -> torch.Tensor:
        """A free input embedding at ``t`` optimised (Adam, ``relax_steps``) to match ``target`` [R, H] after the
        cached prefixes, started at the rows of ``tokens`` [R] (SipIt's continuous step). Returns it [R, E]."""
        rows = tokens.shape[0]
        pos = torch.full((rows, 1), t, dtype=torch.long)
        mask = torch.ones(rows, t + 1, dtype=torch.long)
        if self._unit_table is None:
            self._unit_table = F.normalize(self.table, dim=-1)
            self._relax_lr = 0.1 * float(self.table.std())
        emb = self.head.embed(tokens[:, None]).detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=self._relax_lr)
        with torch.enable_grad():
            for _ in range(self.opt.relax_steps):
                sub = select(cache, torch.arange(rows)) if cache is not None else self._fresh()
                x = emb if self.head.pos_embed is None else emb + self.head.pos_embed(pos)
                h = self.head(tokens[:, None], mask, pos, inputs_embeds=x, cache=sub)[:, 0]
                loss = -self.scorer.score(target, h, first=t == 0).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return emb.detach()[:, 0]

    # -- the search ----------------------------------------------------------------------------------------

    def _proposed(self, proposer: LinearInverter, tgt: torch.Tensor, t: int, lm_logits: torch.Tensor | None,
                  fixed: torch.Tensor | None) -> torch.Tensor:
        """Candidates [R, K'] at position ``t`` from the (possibly self-trained) ``proposer``: its top
        ``candidates`` tokens, then (``fuse`` > 0 and an LM) the top ``candidates`` others by LM log-probability
        + ``fuse`` x cosine, then ``fixed`` [R, M] (extra candidates handed to ``run``)."""
        k = min(self.opt.candidates, self.vocab)
        with timed(self.seconds, "proposer"):
            cos = proposer.similarities(tgt, torch.full((tgt.shape[0],), t))[:, : self.vocab]
            own = cos.topk(k, dim=-1).indices
            parts = [own]
            if self.opt.fuse > 0 and lm_logits is not None:
                fused = lm_logits[:, : self.vocab].float().log_softmax(-1) + self.opt.fuse * cos
                fused.scatter_(1, own, float("-inf"))
                parts.append(fused.topk(k, dim=-1).indices)
        if fixed is not None:
            parts.append(fixed)
        return torch.cat(parts, 1)

    def _self_train(self, proposer: LinearInverter, target: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                    scores: torch.Tensor, lo: int, hi: int) -> None:
        """Refit ``proposer`` with positions ``lo..hi-1`` of the best prefix of each sequence (rows ``ids``
        [N, T], ``scores`` [N, T]) where the match reached ``self_train_above``."""
        ok = mask[:, lo:hi].bool() & (scores[:, lo:hi] >= self.opt.self_train_above)
        n_idx, t_idx = ok.nonzero(as_tuple=True)
        with timed(self.seconds, "self_train"):
            proposer.add(target[n_idx, lo + t_idx], lo + t_idx, ids[n_idx, lo + t_idx], self.opt.self_train_weight)

    def run(self, target: torch.Tensor, mask: torch.Tensor, proposals: torch.Tensor | None,
            bonus: torch.Tensor | None = None, proposer: LinearInverter | None = None,
            known: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """``target`` [N, T, H] observed outputs, ``mask`` [N, T], ``proposals`` [N, T, K] candidate tokens
        (or None: widening only, starting from the nearest embedding row of the target). ``proposer``
        (optional): proposes at each position instead (``_proposed``; ``proposals`` are then extra candidates),
        fused with the LM and self-trained as ``PrefixOptions`` say. ``bonus`` [N, T, V] (optional): other
        evidence added to every candidate's score (``bisr``: the gradient's). ``known``: the tokens every
        sequence starts with (``known_prefix``), taken as they are. Returns the best token ids [N, T] and their
        per-position scores [N, T]."""
        n, length, _ = target.shape
        beam = self.opt.beam
        ids = torch.zeros(n * beam, length, dtype=torch.long)  # rows: sequence-major, beam-minor
        scores = torch.zeros(n * beam, length)
        total = torch.zeros(n * beam)
        total[torch.arange(n * beam) % beam != 0] = -1e9  # at t = 0 only the first beam is alive
        seq_of_row = torch.arange(n * beam) // beam
        keep = max(1, self.opt.alternatives)
        alt_ids = torch.zeros(n * beam, length, keep, dtype=torch.long)
        alt_s = torch.full((n * beam, length, keep), float("-inf"))
        cache: DynamicCache | None = None
        lm_cache, lm_logits = (None, None) if self.lm is None else self._lm_step(
            None, torch.full((n * beam,), self.start_token, dtype=torch.long), 0)
        last = int(mask.sum(1).max())
        for t in range(last):
            tgt = target[seq_of_row, t]  # [NB, H]
            if t < len(known):  # a token the clients' tokenisation puts before every text (Gemma's <bos>)
                cand = torch.full((n * beam, 1), known[t], dtype=torch.long)
            elif proposer is not None:
                cand = self._proposed(proposer, tgt, t, lm_logits,
                                      None if proposals is None else proposals[seq_of_row, t])
            elif proposals is not None:
                cand = proposals[seq_of_row, t]  # [NB, K]
            else:
                cand = (F.normalize(tgt[:, : self.table.shape[1]], dim=-1)
                        @ F.normalize(self.table, dim=-1).T).topk(1, dim=-1).indices
            # Sequences that have ended (padding) are neither verified nor widened: their first candidate stands
            # in at a finite score, so the beam step stays defined (the result is masked there).
            live = mask[seq_of_row, t].bool()
            rows = live.nonzero().squeeze(1).repeat_interleave(cand.shape[1])
            s = torch.full(cand.shape, float("-inf"))
            s[~live, 0] = 1.0
            with timed(self.seconds, "proposals"):
                s[live] = self._verify(cache, rows, cand[live].reshape(-1), t, tgt[rows]).reshape(-1, cand.shape[1])
            if t >= len(known):
                cand, s = self._widen(cache, cand, s, t, tgt, lm_logits, live)
            if bonus is not None:
                s = s + bonus[seq_of_row, t].gather(1, cand)
            self.stats["positions"] += n
            # Beam step: per sequence, the best `beam` of (beam row, candidate) by summed score.
            joint = (total[:, None] + s).reshape(n, -1)  # [N, B*C]
            width = cand.shape[1]
            best = joint.topk(beam, dim=-1).indices  # [N, B]
            parent = (torch.arange(n)[:, None] * beam + best // width).reshape(-1)
            choice = (best % width).reshape(-1)
            token = cand[parent, choice]
            ids = ids[parent]
            scores = scores[parent]
            ids[:, t] = token
            scores[:, t] = s[parent, choice]
            runner = s.topk(min(keep, width), dim=-1)
            alt_ids, alt_s = alt_ids[parent], alt_s[parent]
            alt_ids[:, t, : runner.indices.shape[1]] = cand.gather(1, runner.indices)[parent]
            alt_s[:, t, : runner.indices.shape[1]] = runner.values[parent]
            total = joint.gather(1, best).reshape(-1)
            # Extend the kept prefixes' cache by their chosen token.
            with torch.no_grad(), timed(self.seconds, "extend"):
                cache = select(cache, parent) if cache is not None else self._fresh()
                self._step(cache, token, t)
            if self.lm is not None and t + 1 < last:
                with timed(self.seconds, "lm_prefix"):
                    lm_cache, lm_logits = self._lm_step(select(lm_cache, parent), token, t + 1)
            every = self.opt.self_train_every
            if proposer is not None and every > 0 and (t + 1) % every == 0 and t + 1 < last:
                lead = total.reshape(n, beam).argmax(-1) + torch.arange(n) * beam  # each sequence's best prefix
                self._self_train(proposer, target, mask, ids[lead], scores[lead], t + 1 - every, t + 1)
        top = total.reshape(n, beam).argmax(-1) + torch.arange(n) * beam
        self.alternatives = (alt_ids[top], alt_s[top])
        return ids[top].masked_fill(~mask.bool(), 0), scores[top]

    def forced(self, target: torch.Tensor, mask: torch.Tensor, cand: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Teacher-forced scores [N, T, C] of candidates ``cand`` [N, T, C] with the true prefix ``truth``
        [N, T] (the attacker's own shadow text): what the search would see at each position."""
        n, length, c = cand.shape
        out = torch.zeros(n, length, c)
        cache: DynamicCache | None = None
        rows = torch.arange(n).repeat_interleave(c)
        for t in range(int(mask.sum(1).max())):
            out[:, t] = self._verify(cache, rows, cand[:, t].reshape(-1), t, target[rows, t]).reshape(n, c)
            with torch.no_grad():
                cache = cache if cache is not None else self._fresh()
                self._step(cache, truth[:, t], t)
        return out

    def _widen(self, cache, cand: torch.Tensor, s: torch.Tensor, t: int, tgt: torch.Tensor,
               lm_logits: torch.Tensor | None, live: torch.Tensor):
        """Widening of the ``live`` rows where the best score is below the bar: gradient-guided rounds over the
        whole vocabulary (SipIt's continuous step after the first), then the public LM's most likely next tokens
        (``prior``, when an LM is given)."""
        opt = self.opt
        rounds = [("gradient", opt.widen)] * opt.widen_rounds if opt.widen > 0 else []
        if opt.relax_steps > 0 and opt.widen > 0:
            rounds = rounds[:1] + [("relax", opt.widen)] + rounds[1:]
        if lm_logits is not None:  # last: the gradient rounds start from the proposer's best, as without it
            rounds = rounds + [("lm", opt.prior)]
        if not rounds:
            return cand, s
        tried = [cand]
        scores = [s]
        widened = False
        s = s.clone()
        again = opt.widen_below if opt.widen_again_below is None else min(opt.widen_again_below, opt.widen_below)
        for i, (kind, width) in enumerate(rounds):
            cat_c, cat_s = torch.cat(tried, 1), torch.cat(scores, 1)
            best_s, arg = cat_s.max(1)
            poor = ((best_s < (opt.widen_below if i == 0 else again)) & live).nonzero().squeeze(1)
            if poor.numel() == 0:
                break
            widened = True
            best_tok = cat_c[poor, arg[poor]]
            sub = select(cache, poor) if cache is not None else None
            with timed(self.seconds, kind):
                if kind == "lm":
                    gain = lm_logits[poor].clone()
                elif kind == "relax":  # nearest rows to the optimised free embedding
                    gain = F.normalize(self._relax(sub, best_tok, t, tgt[poor]), dim=-1) @ self._unit_table.T
                else:
                    grad = self._gradient(sub, best_tok, t, tgt[poor])  # [P, E]
                    gain = grad @ self.table.T  # [P, V]: first-order score change, up to a per-row constant
                gain = gain[:, : self.vocab]
                gain.scatter_(1, cat_c[poor], float("-inf"))  # never re-verify a token
                new = gain.topk(min(width, self.vocab), dim=-1).indices  # [P, W]
                rows = poor.repeat_interleave(new.shape[1])
                ns = self._verify(cache, rows, new.reshape(-1), t, tgt[rows]).reshape(new.shape)
            full_c = cat_c.new_zeros(cand.shape[0], new.shape[1])
            full_s = torch.full((cand.shape[0], new.shape[1]), float("-inf"))
            full_c[poor], full_s[poor] = new, ns
            tried.append(full_c)
            scores.append(full_s)
        if widened:
            self.stats["widened_positions"] += int(((s.max(1).values < opt.widen_below) & live).sum())
        return torch.cat(tried, 1), torch.cat(scores, 1)


