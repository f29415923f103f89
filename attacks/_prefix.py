"""Prefix inversion machinery shared by ``prefix_inversion`` and ``bisr`` (SipIt-style, position by position).

A causal head's output at position ``t`` depends only on tokens ``0..t``. With the prefix ``0..t-1`` already
recovered (its keys/values in a ``transformers`` KV cache), every candidate for token ``t`` is verified by one
incremental step of the reference head (public, or the colluder's fine-tuned head) and the candidate whose
output is closest to the observed one is kept. Candidates come from

* a proposer: the closed-form linear inverter (ridge from standardised head outputs to the normalised input
  embedding of the token, fitted on shadow text through the public head: ``attacks.learned_inversion``'s
  training pairs), its top ``candidates`` tokens at each position; and
* widening, where the best match is poor: the gradient of the match score with respect to the input
  embedding at ``t`` (evaluated at the current best token, one backward step through the cached head) ranks
  the **whole vocabulary** by the first-order change ``g · (E_v - E_best)``; the top ``widen`` unseen tokens
  are verified, for up to ``widen_rounds`` rounds (GCG / SipIt-style coordinate search);
* a continuous step after the first gradient round, where the match is still poor (``relax_steps``): a free
  input embedding at ``t``, started at the best token's row, is optimised (Adam) to match the observed output
  and its nearest vocabulary rows are verified (SipIt's relaxation). Measured on SmolLM2 at k = 8 it finds the
  tokens the first-order ranking misses (BENCHMARKS.md, issue 10);
* optionally (``prior``), the public LM's most likely next tokens given the recovered prefix, verified last,
  where the rounds above left the match poor.

The first token, and the next ``early_positions - 1`` where their match stayed poor, are re-decided last
(``refine_first``) over the proposer's candidates and whole-vocabulary candidates ranked by the gradient of the
outputs after them (``first_candidates``); then every near-tie (a
runner-up within ``tie_margin`` of the chosen token's score) is re-decided by the match of the few outputs
after it (``refine_ties``).

A beam of width ``beam`` keeps the best prefixes by summed score (a wrong early token changes every later
output, so a beam can recover from a near-tie).

Score: cosine similarity of standardised vectors ``w ⊙ (x - mu)``, with ``mu`` the mean and ``w = 1 /
sqrt(rho² sd² + noise_var)`` per hidden dimension (statistics of the reference head's outputs on shadow text;
``noise_var`` the per-dimension variance the deployed defense adds, measured on the attacker's own simulation
of it, 0 for none). Standardising keeps SmolLM2's few "massive activation" dimensions from dominating;
cosine tolerates the scale changes of fine-tuning drift and of norm clipping; ``noise_var`` down-weights
dimensions the defense drowns in noise (a Gaussian likelihood's weighting).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from attacks._common import run_head, token_embeddings
from attacks._pairs import ridge_solve, training_pairs
from suite.engine.split import ClientHead, position_ids_for


@dataclass(frozen=True)
class SearchOptions:
    candidates: int = 32  # proposer's top tokens verified at every position
    beam: int = 1  # prefixes kept per sequence
    widen: int = 64  # tokens per widening round (gradient-ranked over the whole vocabulary)
    widen_rounds: int = 3  # widening rounds at most, where the best match stays poor
    widen_below: float = 0.98  # widen where the best score (cosine) is below this
    widen_again_below: float | None = None  # the bar for the rounds after the first (None: widen_below)
    prior: int = 0  # the public LM's most likely next tokens given the recovered prefix, verified last when widening
    relax_steps: int = 0  # where still poor after the first round: optimise a free embedding, verify its nearest rows
    alternatives: int = 4  # runner-up tokens kept per position (``PrefixSearch.alternatives``, for ``refine_ties``)
    chunk: int = 1024  # rows per incremental forward
    # With a ``LinearProposer`` handed to ``run`` (see there): ``fuse`` > 0 adds the top ``candidates`` tokens of
    # the public LM's log-probability given the recovered prefix + ``fuse`` x the proposer's cosine (a product of
    # experts) to the proposer's own; every ``self_train_every`` positions the proposer is refitted with the
    # recovered tokens that matched at least ``self_train_above`` (weight ``self_train_weight`` per pair).
    fuse: float = 0.0
    self_train_every: int = 0
    self_train_above: float = 0.8
    self_train_weight: float = 4.0


@dataclass
class Scorer:
    """Cosine similarity of ``w ⊙ (x - mu)`` (see the module docstring). Position 0 has statistics of its own
    (``mu0``, ``w0``): with nothing before it to attend to, its output lives elsewhere (the attention-sink
    dimensions dominate it), and standardising it with the other positions' statistics would flatten the
    differences between candidate first tokens."""

    mu: torch.Tensor  # [H]
    w: torch.Tensor  # [H]
    mu0: torch.Tensor | None = None  # [H], position 0
    w0: torch.Tensor | None = None

    def normed(self, x: torch.Tensor, first: bool = False) -> torch.Tensor:
        mu, w = (self.mu0, self.w0) if first and self.mu0 is not None else (self.mu, self.w)
        return F.normalize((x.float() - mu) * w, dim=-1)

    def score(self, target: torch.Tensor, cand: torch.Tensor, first: bool = False) -> torch.Tensor:
        """``target`` [..., H], ``cand`` [..., H] (broadcast) -> [...]; ``first``: both are at position 0."""
        return (self.normed(target, first) * self.normed(cand, first)).sum(-1)

    def score_positions(self, target: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """``target``, ``cand`` [N, T, H] aligned by position -> [N, T] (position 0 with its own statistics)."""
        out = self.score(target, cand)
        return torch.cat([self.score(target[:, :1], cand[:, :1], first=True), out[:, 1:]], 1)

    @staticmethod
    def _weights(flat: torch.Tensor, noise_var: torch.Tensor | None, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sd = flat.mean(0), flat.std(0)
        sd = sd.clamp_min(float(sd.median()) * 1e-2 + 1e-6)
        var = (rho * sd) ** 2 + (noise_var if noise_var is not None else 0.0)
        return mu, var.rsqrt()

    @staticmethod
    def fit(feats: torch.Tensor, mask: torch.Tensor, noise_var: torch.Tensor | None = None,
            rho: float = 1.0) -> Scorer:
        mu, w = Scorer._weights(feats[mask.bool()].float(), noise_var, rho)
        first = feats[:, 0][mask[:, 0].bool()].float()
        if first.shape[0] < 8:  # too few sequences for position-0 statistics: share the others'
            return Scorer(mu, w)
        mu0, w0 = Scorer._weights(first, noise_var, rho)
        return Scorer(mu, w, mu0, w0)


@contextmanager
def timed(seconds: dict, phase: str):
    """Adds the wall seconds of the block to ``seconds[phase]`` (where an attack's time goes)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start


def select(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A new cache holding rows ``index`` of ``cache`` (the original is left untouched)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


class PrefixSearch:
    """Position-by-position search over a reference ``head`` (frozen, eval mode)."""

    def __init__(self, head: ClientHead, config, scorer: Scorer, options: SearchOptions,
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
            from attacks._adaptive import LMPrior

            self._prior = LMPrior(self.lm)
        with torch.no_grad():
            return self._prior._step(tokens[:, None], torch.ones(tokens.shape[0], length + 1, dtype=torch.long), cache)

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

    def _proposed(self, proposer: LinearProposer, tgt: torch.Tensor, t: int, lm_logits: torch.Tensor | None,
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

    def _self_train(self, proposer: LinearProposer, target: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor,
                    scores: torch.Tensor, lo: int, hi: int) -> None:
        """Refit ``proposer`` with positions ``lo..hi-1`` of the best prefix of each sequence (rows ``ids``
        [N, T], ``scores`` [N, T]) where the match reached ``self_train_above``."""
        ok = mask[:, lo:hi].bool() & (scores[:, lo:hi] >= self.opt.self_train_above)
        n_idx, t_idx = ok.nonzero(as_tuple=True)
        with timed(self.seconds, "self_train"):
            proposer.add(target[n_idx, lo + t_idx], lo + t_idx, ids[n_idx, lo + t_idx], self.opt.self_train_weight)

    def run(self, target: torch.Tensor, mask: torch.Tensor, proposals: torch.Tensor | None,
            bonus: torch.Tensor | None = None, proposer: LinearProposer | None = None,
            known: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """``target`` [N, T, H] observed outputs, ``mask`` [N, T], ``proposals`` [N, T, K] candidate tokens
        (or None: widening only, starting from the nearest embedding row of the target). ``proposer``
        (optional): proposes at each position instead (``_proposed``; ``proposals`` are then extra candidates),
        fused with the LM and self-trained as ``SearchOptions`` say. ``bonus`` [N, T, V] (optional): other
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


# -- what the attacks around the search share ------------------------------------------------------------------


def reference_head(obs, use_colluder: bool = True) -> tuple[ClientHead, object, torch.nn.Module]:
    """The head candidates are verified on: the colluder's fine-tuned head when granted (closest to the
    victims'), else the public one. Returns (head, model config, the public model: the LM prior's)."""
    base = obs.base_model()
    base.requires_grad_(False)
    base.eval()
    config = base.config
    if use_colluder and obs.colluder_head_tail is not None:
        head, _ = obs.colluder_head_tail()
    else:
        from suite.engine.split import split_model

        head = split_model(base, obs.spec).client_head
    head.requires_grad_(False)
    return head.eval(), config, base


def reference_source(obs, use_colluder: bool = True) -> str:
    """``training_pairs``' name for ``reference_head``'s outputs on shadow text."""
    return f"{'colluder' if use_colluder and obs.colluder_head_tail is not None else 'base'} x shadow"


def start_token(tokenizer) -> int | None:
    """The token a public LM reads a document start after: the end-of-text separator it was pre-trained with
    (GPT-2, SmolLM), else its beginning-of-sequence token."""
    for tok in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tok is not None:
            return int(tok)
    return None


def known_prefix(tokenizer) -> tuple[int, ...]:
    """The special tokens the clients' tokenisation puts before every text (Gemma's ``<bos>``; none for
    SmolLM2): public, since the tokenizer is, so the search takes them as they are instead of searching them. A
    deep head's output at position 0 says almost nothing about its own token (the attention sink), and a
    wrong guess there poisons every later position's verification."""
    runs = [tokenizer(text)["input_ids"] for text in ("Hello world.", "7 zebras, quietly")]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    out = []
    for a, b in zip(*runs, strict=False):
        if a != b or a not in special:
            break
        out.append(int(a))
    return tuple(out)


def shadow_batch(obs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shadow text tokenised as the clients tokenise (right padding to ``max_length``), or None."""
    if not obs.shadow:
        return None
    enc = obs.tokenizer(list(obs.shadow), padding="max_length", truncation=True, max_length=obs.max_length,
                        padding_side="right", return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def defense_noise(obs, head, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Per-dimension variance of what the deployed defense adds to the head output, measured on the attacker's
    own simulation (``Defense.simulate_release`` on shadow text, two independent draws: half the variance of
    their difference) and the simulated releases' statistics. Zero where the defense adds no randomness."""
    defense = obs.defense
    g1, g2 = torch.Generator().manual_seed(seed + 101), torch.Generator().manual_seed(seed + 202)
    with torch.no_grad():
        r1 = defense.simulate_release(head, ids, mask, g1).float()
        r2 = defense.simulate_release(head, ids, mask, g2).float()
    real = mask.bool()
    var = ((r1 - r2)[real].pow(2).mean(0) / 2).clamp_min(0)
    return var, {"defense": getattr(defense, "name", type(defense).__name__),
                 "simulated_noise_rms": float(var.mean().sqrt())}


class LinearProposer:
    """The closed-form linear inverter of ``learned_inversion`` (mode="linear"): ridge from standardised
    [features, one-hot position, 1] to the normalised input-embedding row, fitted on (shadow text x reference
    head) pairs. Called on targets [N, T, H] it returns their top-``k`` tokens by cosine [N, T, k].

    ``add`` self-trains it on the victims' own traffic: pairs of an observed output and the token the search
    recovered there (where it matched well) join the normal equations and the ridge is solved again. The
    victims' text and their fine-tuned head differ from the shadow text and the public head the proposer was
    fitted on (the domain, and the drift); their own recovered pairs carry both. Measured on Gemma 3 at k = 8
    (BENCHMARKS.md, issue 21): with the first 8 positions' pairs, the true token is in the top 32 at 82 % of the
    later positions, against 66 % from the shadow pairs alone."""

    def __init__(self, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, k: int,
                 lam: float = 1e-2):
        real = mask.bool()
        flat = feats[real].float()
        self.mu, sd = flat.mean(0), flat.std(0)
        self.sd = sd.clamp_min(float(sd.median()) * 1e-2 + 1e-6)
        self.length, self.k, self.lam = feats.shape[1], k, lam
        self.rows = F.normalize(table.float(), dim=-1)  # [V, E]
        x = self.features(feats.float())[real].double()
        self.gram, self.xty = x.T @ x, x.T @ self.rows[ids[real]].double()
        self.added = 0
        self._solve()

    def features(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] outputs at ``positions`` (default: their index along dim -2 of [N, T, H]) -> features."""
        if positions is None:
            positions = torch.arange(x.shape[-2]).expand(*x.shape[:-1])
        onehot = F.one_hot(positions.clamp_max(self.length - 1), self.length).to(x.dtype)
        return torch.cat([(x - self.mu) / self.sd, onehot, torch.ones(*x.shape[:-1], 1)], -1)

    def _solve(self) -> None:
        self.w = ridge_solve(self.gram, self.xty, self.lam)

    def add(self, feats: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, weight: float = 1.0) -> None:
        """Self-training: pairs (output [M, H] at ``positions`` [M], token ``ids`` [M]) join the fit."""
        if ids.numel() == 0:
            return
        x = self.features(feats.float(), positions).double()
        self.gram += weight * (x.T @ x)
        self.xty += weight * (x.T @ self.rows[ids].double())
        self.added += int(ids.numel())
        self._solve()

    def similarities(self, target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cosine [R, V] of every vocabulary row with the predicted embedding of ``target`` [R, H] at
        ``positions`` [R]."""
        pred = F.normalize(self.features(target.float(), positions) @ self.w, dim=-1)
        return pred @ self.rows.T

    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        n, length = target.shape[:2]
        out = torch.empty(n, length, self.k, dtype=torch.long)
        for i in range(n):
            out[i] = self.similarities(target[i], torch.arange(length)).topk(self.k, dim=-1).indices
        return out


def fit_linear_proposer(obs, k: int, lam: float = 1e-2, known: dict[str, torch.Tensor] | None = None
                        ) -> LinearProposer:
    """``LinearProposer`` on (shadow text x public head) pairs (``attacks._pairs.training_pairs``, with the
    colluder's head and records where granted). ``known``: head outputs on shadow text already computed.
    Returns it: ``propose(target [N, T, H]) -> [N, T, k]`` top-``k`` tokens by cosine."""
    pairs, base = training_pairs(obs, use_colluder=True, known=known)
    return LinearProposer(pairs.feats, pairs.ids, pairs.mask, token_embeddings(base), k, lam)


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


def calibrate(head: ClientHead, config, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
              scores: torch.Tensor, scorer: Scorer, steps: int, lr: float = 1e-3, rank: int = 8,
              keep: float = 0.9, fit: torch.Tensor | None = None) -> ClientHead:
    """The victims' head drifted from the reference by fine-tuning: estimate the drift from their own traffic.

    A LoRA adapter (rank ``rank`` on the family's attention projections, the public training recipe's targets)
    is fitted to a copy of ``head`` so that its outputs on the recovered text ``ids`` match the observed
    ``target`` under the search's score; positions whose first-pass score is in the lowest ``1 - keep``
    fraction (the likely wrong tokens) are left out of the fit, and so are positions outside ``fit`` [N, T] (bool;
    all real positions when None). Returns the calibrated head (frozen, eval)."""
    import types

    from peft import LoraConfig, inject_adapter_in_model

    from suite.engine.split import family_of, lora_targets

    model = copy.deepcopy(head)
    targets = lora_targets(model, family_of(types.SimpleNamespace(config=config)), "attention")
    real = mask.bool() if fit is None else mask.bool() & fit
    if not targets or steps <= 0 or not real.any():
        return head
    with warnings.catch_warnings():  # a colluder's head already carries its own adapter: this one joins it
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets),
                                model, adapter_name="calibration")
    params = [p for n, p in model.named_parameters() if "lora_" in n and ".calibration" in n]  # never a colluder's own
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    bar = torch.quantile(scores[real].float(), 1.0 - keep) if keep < 1 else torch.tensor(-2.0)
    use = real & (scores >= bar)
    pos = position_ids_for(mask)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            out = model(ids, mask, pos)
            loss = (1 - scorer.score_positions(target, out)[use]).mean()
            loss.backward()
            opt.step()
    model.requires_grad_(False)
    return model.eval()


def prefix_invert(obs, cfg, target: torch.Tensor, mask: torch.Tensor, bonus: torch.Tensor | None = None,
                  more: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The search on ``target`` [N, T, H] (observed head outputs), as configured by ``cfg`` (fields of
    ``PrefixInversionConfig``). ``bonus`` [N, T, V]: other evidence added to every candidate's score;
    ``more`` [N, T, M]: extra candidate tokens. Returns token ids [N, T] and diagnostics."""
    seconds: dict[str, float] = defaultdict(float)
    setup = time.perf_counter()
    head, config, lm = reference_head(obs, cfg.use_colluder)
    shadow = shadow_batch(obs)
    extra: dict = {"reference": reference_source(obs, cfg.use_colluder).split()[0],
                   "adaptive": bool(cfg.adaptive and obs.defense is not None)}
    noise = None
    if extra["adaptive"] and shadow is not None:
        noise, info = defense_noise(obs, head, *shadow, seed=cfg.seed)
        extra.update(info)
    known = {}
    if shadow is not None:
        outputs = run_head(head, *shadow)
        known[reference_source(obs, cfg.use_colluder)] = outputs  # the proposer's training pairs too
        scorer = Scorer.fit(outputs, shadow[1], noise, cfg.rho)
    else:
        scorer = Scorer.fit(target, mask, noise, cfg.rho)
    proposals, propose = None, None
    options = SearchOptions(candidates=cfg.candidates, beam=cfg.beam, widen=cfg.widen,
                            widen_rounds=cfg.widen_rounds, widen_below=cfg.widen_below,
                            widen_again_below=getattr(cfg, "widen_again_below", None),
                            prior=getattr(cfg, "prior", 0), relax_steps=getattr(cfg, "relax_steps", 0),
                            alternatives=getattr(cfg, "tie_alternatives", 4), fuse=getattr(cfg, "fuse", 0.0),
                            self_train_every=getattr(cfg, "self_train_every", 0),
                            self_train_above=getattr(cfg, "self_train_above", 0.8))
    # Proposing position by position (fused with the LM, self-trained on the recovered pairs) or once up front.
    online = options.fuse > 0 or options.self_train_every > 0
    if obs.shadow:
        propose = fit_linear_proposer(obs, min(cfg.candidates, head.embed.num_embeddings), known=known)
        proposals = None if online else propose(target)
    if more is not None:
        proposals = more if proposals is None else torch.cat([proposals, more], -1)
    search = PrefixSearch(head, config, scorer, options, lm, start_token(obs.tokenizer))
    seconds["setup"] = time.perf_counter() - setup  # reference head, scorer, proposer and its proposals
    known = known_prefix(obs.tokenizer)
    extra["known_prefix"] = len(known)
    with timed(seconds, "search"):
        ids, scores = search.run(target, mask, proposals, bonus, propose if online else None, known)
    real = mask.bool()
    steps = getattr(cfg, "calibrate_steps", 0)
    noisy = noise is not None and float(noise.sum()) > 0  # drowned in defense noise: there is no drift to fit
    if steps > 0 and real.any() and not noisy and float(scores[real].mean()) < getattr(cfg, "calibrate_below", 1.0):
        # Second pass on a reference head calibrated to the victims' drift (see ``calibrate``).
        extra["first_pass_mean_score"] = float(scores[real].mean())
        with timed(seconds, "calibration"):
            tuned = calibrate(head, config, ids.masked_fill(~real, 0), mask, target, scores, scorer, steps)
            first = dict(search.stats)
            search = PrefixSearch(tuned, config, scorer, options, lm, start_token(obs.tokenizer))
            ids, scores = search.run(target, mask, proposals, bonus, propose if online else None, known)
        extra["first_pass"] = first
    if online and propose is not None:  # the early-position step's candidates, from the self-trained proposer
        extra["self_trained_pairs"] = propose.added
        proposals = propose(target) if more is None else torch.cat([propose(target), more], -1)
    # The first positions, re-decided with what follows them (position 0 always; later early positions where
    # the search's own match stayed poor): the proposer's candidates, the search's runner-ups and
    # whole-vocabulary candidates ranked by the gradient of the outputs after them.
    extra["first_tokens_changed"] = extra["early_tokens_changed"] = 0
    first_real = len(known)  # the first searched position (after the known prefix)
    last_early = first_real + getattr(cfg, "early_positions", 1)
    decide = search.head  # the head the early positions and near-ties are re-decided on
    if (getattr(cfg, "calibrate_early", 0) > 0 and real.any() and not noisy
            and float(scores[real].mean()) < getattr(cfg, "calibrate_below", 1.0)):
        # The victims' drift, estimated from the positions after the early ones (whose outputs lean least on
        # the sink and were decided with most context), then used where the public head's drift misleads most.
        with timed(seconds, "early_calibration"):
            later = torch.zeros_like(real)
            later[:, last_early:] = True
            decide = calibrate(search.head, config, ids.masked_fill(~real, 0), mask, target, scores, scorer,
                               cfg.calibrate_early, lr=getattr(cfg, "calibrate_early_lr", 2.5e-3), fit=later)
    early = time.perf_counter()
    for t in range(first_real, min(last_early, ids.shape[1])):
        rows = (real[:, t] if t == first_real else real[:, t] & (scores[:, t] < cfg.widen_below)
                ).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        found = [] if proposals is None else [proposals[rows, t]]
        if t > 0 and search.alternatives is not None:
            found.append(search.alternatives[0][rows, t])
        if getattr(cfg, "first_widen", 0) > 0:
            found.append(first_candidates(decide, scorer, target[rows], mask[rows],
                                          ids[rows].masked_fill(~real[rows], 0), cfg.first_widen, t=t))
        if found:
            sub = None if bonus is None else bonus[rows]
            new, changed = refine_first(decide, scorer, target[rows], mask[rows], ids[rows],
                                        torch.cat(found, 1), sub, t=t)
            ids[rows] = new
            extra["first_tokens_changed" if t == first_real else "early_tokens_changed"] += changed
    seconds["early_positions"] = time.perf_counter() - early
    margin = getattr(cfg, "tie_margin", 0.0)
    if margin > 0 and search.alternatives is not None:
        with timed(seconds, "ties"):
            ids, extra["ties_changed"] = refine_ties(decide, scorer, target, mask, ids, search.alternatives,
                                                     margin, bonus)
    extra.update(search.stats)
    # Wall seconds by phase; the search's own split (proposals verified, each widening kind, the cache and the
    # LM's prefix extended) is inside "search" and is the last search's (after calibration, the second pass).
    extra["seconds_by_phase"] = {k: round(v, 2) for k, v in {**seconds, **{f"search.{k}": v for k, v in
                                                                          search.seconds.items()}}.items()}
    extra["mean_score"] = float(scores[real].mean()) if real.any() else None
    return ids, extra
