"""White-box optimisation inversion of the client head's output (the "relaxation-based white-box inversion" of
VFLAIR-LLM, after the relaxed-input inversions of Song & Raghunathan 2020 and He et al. 2019).

The server knows the head's architecture and its public pretrained weights, so it can search for the input
that the head maps to the activations it observed. Tokens are discrete; the search relaxes them:

1. **Embedding space** (cheap first pass). Start every position at the nearest input-embedding row of the
   observed activation (the ``nearest_embedding`` guess), then optimise the free input embeddings ``X``
   [N, T, H] with Adam so that ``head(X)`` matches the observations. Keep the ``candidates`` vocabulary rows
   nearest (cosine) to each optimised ``X_t``: a per-position shortlist of size K instead of 49,152.
2. **Relaxed tokens.** Per position, logits ``z`` [N, T, K] over the shortlist; the input is the soft
   embedding ``softmax(z / tau) @ E[shortlist]`` (plus learned positions for GPT-2, which the head's
   ``embed_tokens`` would add), run through the head, and ``z`` is optimised with Adam while ``tau`` anneals
   towards a hard choice. The answer is ``argmax z``.

Matching loss, per real (non-padding) position: ``1 - cos + mse_weight * MSE / ||target||^2`` on activations
standardised per hidden dimension (mean / std over the observed positions), so that the few "massive
activation" dimensions of pretrained LMs do not drown the rest. All sequences are optimised in one batch;
costs are ``embed_steps + relax_steps`` forward/backward passes of the k-block head over the whole capture.

With ``COLLUDER_WEIGHTS`` granted the colluder's fine-tuned head replaces the public one: it was trained on the
same task as the victims' heads and is closer to them than the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.toolkit.decoding import LMPrior, choose_prior_weight, nearest_rows
from attacks.toolkit.observe import (
    decode_rows,
    reference_parts,
    stacked,
    token_embeddings,
    tokenize,
    without_positions,
)
from attacks.toolkit.simulate import defended, simulate_shadow
from suite.engine.split import ClientHead, position_ids_for
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations
from suite.scoring.metrics import token_accuracy


@dataclass(frozen=True)
class OptimizationInversionConfig(AttackConfig):
    candidates: int = 32  # shortlist size per position for the relaxed stage
    embed_steps: int = 40  # Adam steps on free input embeddings (stage 1)
    relax_steps: int = 60  # Adam steps on the relaxed token logits (stage 2)
    embed_lr: float = 0.1  # stage-1 learning rate, in units of the embedding table's standard deviation
    relax_lr: float = 0.2  # stage-2 learning rate on the logits
    tau_start: float = 1.0  # softmax temperature at the start of stage 2 ...
    tau_end: float = 0.05  # ... annealed geometrically to this
    mse_weight: float = 1.0
    use_colluder: bool = True  # use the colluder's fine-tuned head when COLLUDER_WEIGHTS is granted
    # Defence-aware (attacks/toolkit/simulate.py): against a defended cell, run the same search on ``adaptive_rows``
    # simulated shadow sequences (defense simulated on shadow text) to choose the public LM prior's weight,
    # then decode the victims' shortlists by beam search over search score + weight x log p_LM.
    adaptive: bool = True
    adaptive_rows: int = 16
    beam: int = 4

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError("candidates must be >= 1")
        if self.embed_steps < 0 or self.relax_steps < 0:
            raise ValueError("embed_steps and relax_steps must be >= 0")
        if not (self.embed_lr > 0 and self.relax_lr > 0 and self.tau_start > 0 and self.tau_end > 0):
            raise ValueError("learning rates and temperatures must be > 0")
        if self.mse_weight < 0:
            raise ValueError("mse_weight must be >= 0")


class _Matcher:
    """``loss(embeds)``: how far the head's output on ``embeds`` [N, T, H] is from the observed activations."""

    def __init__(self, head: ClientHead, target: torch.Tensor, mask: torch.Tensor, mse_weight: float):
        self.head, self.mask, self.mse_weight = head, mask, mse_weight
        self.positions = position_ids_for(mask)
        self.valid = mask.bool()
        real = target[self.valid]
        self.mean = real.mean(0)
        self.std = real.std(0).clamp_min(1e-6) if real.shape[0] > 1 else torch.ones_like(self.mean)
        self.target = (target - self.mean) / self.std
        self.target_sq = self.target.pow(2).mean(-1).clamp_min(1e-8)
        with torch.no_grad():
            self.pos = head.pos_embed(self.positions).float() if head.pos_embed is not None else None

    def per_position(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            embeds = embeds + self.pos
        out = (self.head(None, self.mask, self.positions, inputs_embeds=embeds).float() - self.mean) / self.std
        cos = F.cosine_similarity(out, self.target, dim=-1)
        mse = (out - self.target).pow(2).mean(-1) / self.target_sq
        return (1 - cos) + self.mse_weight * mse

    def loss(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.per_position(embeds)[self.valid].mean()


def _adam(params: list[torch.Tensor], lr: float, steps: int, loss, on_step=None) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()


@register_attack("optimization_inversion")
class OptimizationInversionAttack(Attack):
    requires = frozenset({Capability.ACTIVATIONS, Capability.BASE_WEIGHTS})
    uses = frozenset({Capability.COLLUDER_WEIGHTS, Capability.SHADOW_DATA})  # shadow: the adaptive simulation
    Config = OptimizationInversionConfig

    def _head(self, obs: Observations) -> ClientHead:
        return reference_parts(obs, self.config.use_colluder).head

    def reconstruct(self, obs: Observations) -> Reconstruction:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        hidden, mask = stacked(obs)
        head = self._head(obs)
        extra = {"adaptive": bool(cfg.adaptive), "simulated_defense": False}
        ids, cand, logits, final = self._search(head, hidden, mask)
        extra["match_loss"] = final
        if cfg.adaptive and defended(obs) and obs.shadow and cand is not None:
            sh_ids, sh_mask = tokenize(obs.tokenizer, tuple(obs.shadow)[: cfg.adaptive_rows], obs.max_length)
            released = simulate_shadow(obs, head, sh_ids, sh_mask, cfg.seed)
            h_ids, h_cand, h_logits, _ = self._search(head, released, sh_mask)
            prior = LMPrior(obs.base_model())
            h_scores = torch.log_softmax(h_logits, dim=-1)
            weight, table = choose_prior_weight(prior, h_scores, h_cand, sh_ids, sh_mask)
            extra.update(simulated_defense=True, prior_weight=weight, prior_selection=table,
                         held_accuracy=token_accuracy(sh_ids, h_ids, sh_mask))
            if weight > 0:
                ids = prior.beam(torch.log_softmax(logits, dim=-1), cand, mask, weight, cfg.beam)
                ids = ids.masked_fill(~mask.bool(), 0)
        return Reconstruction(ids, decode_rows(obs.tokenizer, ids, mask), extra=extra)

    def _search(self, head: ClientHead, hidden: torch.Tensor, mask: torch.Tensor):
        """The two-stage search for ``hidden`` [N, T, H]: (ids, shortlist [N, T, K], final logits over it,
        final match loss). Shortlist and logits are None at k = 0 (nothing to search)."""
        cfg = self.config
        table = token_embeddings(head)  # [V, H]
        start = nearest_rows(without_positions(head, hidden, mask), table)
        if len(head.blocks.layers) == 0:  # k = 0: the activations are the embeddings; nothing to optimise
            return start, None, None, 0.0
        match = _Matcher(head, hidden, mask, cfg.mse_weight)

        # Stage 1: free input embeddings, from the nearest-embedding guess.
        embeds = table[start].clone().requires_grad_(True)
        _adam([embeds], cfg.embed_lr * float(table.std()), cfg.embed_steps, lambda: match.loss(embeds))

        # Shortlist: the K rows nearest the optimised embeddings (cosine), the stage-1 guess among them.
        k = min(cfg.candidates, table.shape[0])
        rows = F.normalize(table, dim=-1)
        with torch.no_grad():
            scores = F.normalize(embeds.detach(), dim=-1) @ rows.T  # [N, T, V]
            scores.scatter_(-1, start.unsqueeze(-1), float("inf"))  # keep the nearest-embedding guess
            top, cand = scores.topk(k, dim=-1)
            top[..., 0] = 1.0
            del scores
        cand_rows = table[cand]  # [N, T, K, H]

        # Stage 2: relaxed one-hot over the shortlist, temperature annealed towards a hard choice.
        logits = (top.clamp(max=1.0) * 5.0).clone().requires_grad_(True)
        tau = [cfg.tau_start]
        decay = (cfg.tau_end / cfg.tau_start) ** (1.0 / max(cfg.relax_steps - 1, 1))

        def set_tau(i: int) -> None:
            tau[0] = cfg.tau_start * decay**i

        def soft() -> torch.Tensor:
            return torch.einsum("ntk,ntkh->nth", torch.softmax(logits / tau[0], dim=-1), cand_rows)

        _adam([logits], cfg.relax_lr, cfg.relax_steps, lambda: match.loss(soft()), set_tau)
        ids = cand.gather(-1, logits.detach().argmax(-1, keepdim=True)).squeeze(-1)
        with torch.no_grad():
            final = match.loss(table[ids]).item()
        return ids, cand, logits.detach(), final
