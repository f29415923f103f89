"""BiSR: bidirectional semi-white-box reconstruction (Chen et al., CCS 2024), forward and backward fused.

The server holds two independent views of the same text: the head output it received (forward: prefix
inversion, ``attacks.toolkit.prefix``) and the gradient the client tail returned for the trunk's output (backward:
it carries the labels, the text shifted by one; ``attacks.toolkit.gradients``). BiSR starts from the best forward
reconstruction and refines it to match both. Here the refinement is the same position-by-position search,
re-run with fused scores: every candidate for token ``t`` is scored by

    forward cosine match of the recomputed head output  +  lam * (gradient's fit of label ``t``)

with the gradient's best labels added to the candidates. ``lam`` is chosen on the attacker's own shadow
simulation (never on the victims): shadow text through the reference head, released through the deployed
defense's public mechanism (``Defense.simulate_release``, when ``adaptive``), its gradient recomputed with
the public trunk and tail; candidates are scored teacher-forced and the ``lam`` of the grid that recovers
the most shadow tokens wins. The grid runs from 0 (forward only) to "gradient only", so on its own simulation
the fused attack is never worse than either view alone; a fused weight must beat the better single view there
by a paired test on the tokens they disagree on (``choose_lambda``), else that view alone is used (the
gradient-only view is ``gradient_inversion``'s decoding).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.toolkit.gradients import gradient_evidence, invert_gradients, simulate_gradient
from attacks.toolkit.linear import fit_linear_inverter, pair_source
from attacks.toolkit.observe import decode_rows, reference_parts, run_head, shadow_batch, shared_base, stacked
from attacks.toolkit.prefix.invert import prefix_invert
from attacks.toolkit.prefix.options import PrefixOptions
from attacks.toolkit.prefix.scorer import Scorer
from attacks.toolkit.prefix.search import PrefixSearch
from attacks.toolkit.simulate import defense_noise
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

LAMBDAS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 1e4)
FIRST_TOKEN_CANDIDATES = 64  # gradient_inversion's default, for the gradient-only view


def paired_gain_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar test: the chance of at least ``wins`` of ``wins + losses`` discordant tokens
    going one way if both choices were equally good (each discordant token a fair coin)."""
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n if n else 1.0


def choose_lambda(correct: dict[float, torch.Tensor], alpha: float = 0.05) -> float:
    """The fusion weight from each weight's per-token correctness on the shadow simulation (``correct[lam]``:
    a bool tensor over the same shadow tokens). The better single view (0: forward only, the largest: gradient
    only) is the default; the fused weight with the most tokens right replaces it only where it wins on the
    tokens the two disagree on by a paired (McNemar) test at ``alpha``, Bonferroni-corrected over the fused
    weights tried. A tie on a small simulation is noise, and fusing in a view that adds nothing (the forward
    view under heavy noise) can only cost tokens on the victims; pairing the tokens makes a small real gain
    (the two views agree on most tokens) detectable where comparing two accuracies is not."""
    ends = (LAMBDAS[0], LAMBDAS[-1])
    hits = {lam: int(c.sum()) for lam, c in correct.items()}
    single = max(ends, key=lambda lam: hits[lam])
    fused_grid = [lam for lam in LAMBDAS if lam not in ends]
    fused = max(fused_grid, key=lambda lam: (hits[lam], -abs(lam - 1.0)))
    wins = int((correct[fused] & ~correct[single]).sum())
    losses = int((correct[single] & ~correct[fused]).sum())
    return fused if paired_gain_p(wins, losses) < alpha / len(fused_grid) else single


@dataclass(frozen=True)
class BiSRConfig(AttackConfig):
    candidates: int = 32  # forward proposer (linear inverter) tokens per position
    gradient_candidates: int = 8  # the gradient's best labels added per position
    beam: int = 1
    widen: int = 64
    widen_rounds: int = 2
    widen_below: float = 0.98
    first_widen: int = 128  # whole-vocabulary candidates for the first token, ranked by what follows it
    early_positions: int = 4  # the first positions re-decided that way (where poor; 1: the first token only)
    tie_margin: float = 0.1  # re-decide runner-ups within this score of the choice by the outputs after them (0: off)
    tie_alternatives: int = 4  # runner-ups kept per position for that
    prior: int = 64  # the public LM's most likely next tokens, verified last where widening leaves the match poor
    relax_steps: int = 10  # SipIt's continuous step after the first gradient round, where still poor
    rho: float = 1.0
    solve_steps: int = 8  # Richardson steps undoing the tail blocks (as gradient_inversion)
    shadow_sequences: int = 64  # shadow sequences in the simulation that picks the fusion weight
    adaptive: bool = True
    use_colluder: bool = True
    # Fine-tuning moves deep heads away from the public weights. Where the first pass's mean score stays below
    # ``calibrate_below``, a LoRA drift estimate is fitted to the reference head on the first pass's text
    # (``calibrate_steps`` Adam steps) and a second pass runs on it (0 steps: one pass only).
    calibrate_steps: int = 0
    calibrate_below: float = 0.995
    # The early positions and near-ties re-decided on a drift estimate fitted once on the positions after the
    # early ones (``calibrate_early`` Adam steps at ``calibrate_early_lr``; 0: on the reference head as it is),
    # where the search's forward mean score is below ``calibrate_below``, as prefix_inversion does; there the
    # choice is re-decided with the same fused score as the search's.
    calibrate_early: int = 20
    calibrate_early_lr: float = 2.5e-3

    def __post_init__(self) -> None:
        if self.calibrate_steps < 0 or self.calibrate_early < 0:
            raise ValueError("calibrate_steps and calibrate_early must be >= 0")
        if not self.calibrate_early_lr > 0:
            raise ValueError("calibrate_early_lr must be > 0")
        if min(self.candidates, self.beam, self.shadow_sequences, self.tie_alternatives) < 1 \
                or min(self.gradient_candidates, self.tie_margin, self.early_positions) < 0:
            raise ValueError("candidates, beam, shadow_sequences and tie_alternatives must be >= 1, "
                             "gradient_candidates, tie_margin and early_positions >= 0")
        knobs = (self.widen, self.widen_rounds, self.solve_steps, self.first_widen, self.prior, self.relax_steps)
        if min(knobs) < 0 or not self.rho > 0:
            raise ValueError("widen, widen_rounds, first_widen, prior, relax_steps and solve_steps must be >= 0, rho > 0")

    def options(self) -> PrefixOptions:
        """The forward search as this config sets it (no second-round bar and no fusion with the LM: bisr fuses
        the gradient's evidence instead)."""
        return PrefixOptions(
            candidates=self.candidates, beam=self.beam, widen=self.widen, widen_rounds=self.widen_rounds,
            widen_below=self.widen_below, prior=self.prior, relax_steps=self.relax_steps,
            alternatives=self.tie_alternatives, rho=self.rho, adaptive=self.adaptive, use_colluder=self.use_colluder,
            seed=self.seed, first_widen=self.first_widen, early_positions=self.early_positions,
            tie_margin=self.tie_margin, calibrate_steps=self.calibrate_steps, calibrate_below=self.calibrate_below,
            calibrate_early=self.calibrate_early, calibrate_early_lr=self.calibrate_early_lr)


@register_attack("bisr")
class BiSRAttack(Attack):
    requires = frozenset({Capability.ACTIVATIONS, Capability.GRADIENTS, Capability.BASE_WEIGHTS})
    # the linear proposer is fitted on shadow text (+ a colluder's records); a colluder's head verifies
    uses = frozenset({Capability.SHADOW_DATA, Capability.COLLUDER_WEIGHTS, Capability.COLLUDER_DATA})
    Config = BiSRConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        cfg: BiSRConfig = self.config
        start, cpu = time.perf_counter(), time.process_time()
        if not obs.batches or any(b.gradient is None for b in obs.batches):
            raise ValueError("bisr needs the tail's gradients for every observed batch")
        obs = shared_base(obs)
        target, mask = stacked(obs)
        trunk, tail = self._trunk_tail(obs)
        length = target.shape[1]
        evidence = torch.cat([F.pad(gradient_evidence(trunk, tail, b.hidden, b.attention_mask, b.gradient,
                                                      cfg.solve_steps), (0, 0, 0, length - b.hidden.shape[1]))
                              for b in obs.batches])  # [N, T, V]
        more = evidence.topk(cfg.gradient_candidates, dim=-1).indices if cfg.gradient_candidates else None
        lam, sim = self._choose_lambda(obs, trunk, tail)
        if lam == LAMBDAS[-1]:  # the simulation says the forward view adds nothing: the gradient-only attack
            ids, _, _ = invert_gradients(obs, obs.batches, cfg.solve_steps, FIRST_TOKEN_CANDIDATES, cfg.use_colluder)
            ids, extra = F.pad(ids, (0, length - ids.shape[1])), {"view": "gradient only"}
        else:
            ids, extra = prefix_invert(obs, cfg.options(), target, mask, bonus=lam * evidence, more=more)
            extra["view"] = "forward only" if lam == 0 else "fused"
        ids = ids.masked_fill(~mask.bool(), obs.tokenizer.pad_token_id or 0)
        extra.update({"lambda": lam, "shadow_accuracy_by_lambda": sim, "seconds": time.perf_counter() - start,
                      "cpu_seconds": time.process_time() - cpu})
        return Reconstruction(ids, decode_rows(obs.tokenizer, ids, mask), extra=extra)

    def _trunk_tail(self, obs: Observations):
        parts = reference_parts(obs, self.config.use_colluder)
        return parts.trunk, parts.tail

    def _choose_lambda(self, obs: Observations, trunk, tail) -> tuple[float, dict]:
        """The fusion weight that recovers the most tokens on the attacker's own shadow simulation."""
        cfg: BiSRConfig = self.config
        shadow = shadow_batch(obs)
        if shadow is None:
            return 1.0, {}
        ids, mask = (x[: cfg.shadow_sequences] for x in shadow)
        parts = reference_parts(obs, cfg.use_colluder)
        head, config = parts.head, parts.model.config
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        adaptive = cfg.adaptive and obs.defense is not None
        noise = None
        if adaptive:
            released = obs.defense.simulate_release(head, ids, mask, gen).float()
            noise, _ = defense_noise(obs, head, *shadow, seed=cfg.seed)
        else:
            released = run_head(head, ids, mask)
        outputs = run_head(head, *shadow)
        scorer = Scorer.fit(outputs, shadow[1], noise, cfg.rho)
        grad = simulate_gradient(trunk, tail, released, ids, mask)
        evidence = gradient_evidence(trunk, tail, released, mask, grad, cfg.solve_steps)
        known = {pair_source(parts.source): outputs}  # the proposer's training pairs too
        cand = fit_linear_inverter(obs, cfg.candidates, known=known)(released)
        if cfg.gradient_candidates:
            cand = torch.cat([cand, evidence.topk(cfg.gradient_candidates, dim=-1).indices], -1)
        search = PrefixSearch(head, config, scorer, PrefixOptions(widen_rounds=0))
        forward = search.forced(released, mask, cand, ids)  # [S, T, C]
        bonus = evidence.gather(2, cand)
        real = mask.bool()
        correct = {}
        for lam in LAMBDAS:
            pick = cand.gather(2, (forward + lam * bonus).argmax(-1, keepdim=True))[..., 0]
            correct[lam] = (pick == ids)[real]
        acc = {str(k): round(float(v.float().mean()), 4) for k, v in correct.items()}
        return choose_lambda(correct), acc
