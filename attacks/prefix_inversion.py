"""White-box prefix inversion of the client head's output (SipIt, 2025; the verification idea of PIA, S&P 2025).

Decoder-only LMs are injective on prompts: the head output at position ``t`` is a function of tokens ``0..t``
alone, so with the prefix recovered, token ``t`` is the candidate whose recomputed output matches the observed
one. ``attacks.toolkit.prefix`` holds the search (KV-cached incremental verification, a beam, and gradient-guided
widening over the whole vocabulary where the proposer's candidates all match poorly); this module wires it
to what the threat grants:

* reference head: the colluder's fine-tuned head with ``COLLUDER_WEIGHTS``, else the public base head;
* proposer: the closed-form linear inverter fitted on shadow text with ``SHADOW_DATA`` (else widening alone,
  started from the nearest input-embedding row); where its candidates all match poorly, a gradient-ranked
  round over the whole vocabulary, a continuous step (a free embedding optimised to match, its nearest rows
  verified: SipIt's) and another gradient round; the first token is re-decided over whole-vocabulary
  candidates ranked by the outputs after it;
* defended cells (``adaptive=True``, the default): the deployed defense's public mechanism is simulated on
  the attacker's shadow text (``Defense.simulate_release``) and the per-dimension noise it adds enters the
  score's weighting (see ``attacks.toolkit.prefix``); ``adaptive=False`` ignores the defense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from attacks.toolkit.observe import decode_rows, shared_base, stacked
from attacks.toolkit.prefix.invert import prefix_invert
from attacks.toolkit.prefix.options import PrefixOptions
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations


@dataclass(frozen=True)
class PrefixInversionConfig(AttackConfig):
    candidates: int = 32  # proposer (linear inverter) tokens verified at every position
    beam: int = 1  # prefixes kept per sequence
    widen: int = 64  # gradient-ranked tokens per widening round
    widen_rounds: int = 2  # gradient widening rounds at most per position
    widen_below: float = 0.98  # widen where the best cosine score is below this
    # The later rounds (continuous step, second gradient round, LM) only where the first left the match below
    # this (set it to widen_below to widen as deep everywhere): a wrong token scores far lower than a drifted
    # right one (measured at k = 8: wrong <= 0.90, right >= 0.95)
    widen_again_below: float | None = 0.95
    prior: int = 32  # the public LM's likely next tokens given the recovered prefix, verified last where still poor
    relax_steps: int = 10  # SipIt's continuous step after the first gradient round, where still poor (0: off)
    first_widen: int = 64  # gradient-ranked whole-vocabulary candidates for the first token (see refine_first)
    early_positions: int = 4  # the first positions re-decided that way (where poor; 1: the first token only)
    tie_margin: float = 0.1  # re-decide runner-ups within this score of the choice by the outputs after them (0: off)
    tie_alternatives: int = 4  # runner-ups kept per position for that
    # The proposer, position by position: also the top `candidates` tokens by the public LM's log-probability
    # given the recovered prefix + fuse x the proposer's cosine (0: off; needs prior > 0), and refitted every
    # self_train_every positions with the recovered tokens that matched at least self_train_above (0: off)
    fuse: float = 0.0
    self_train_every: int = 0
    self_train_above: float = 0.8
    rho: float = 1.0  # drift allowance: weight of the head's own spread in the score's per-dimension scale
    adaptive: bool = True  # simulate the deployed defense (its public mechanism) when scoring
    use_colluder: bool = True  # verify on the colluder's fine-tuned head when COLLUDER_WEIGHTS is granted
    # Fine-tuning moves deep heads away from the public weights. Where the first pass's mean score stays below
    # ``calibrate_below``, a LoRA drift estimate is fitted to the reference head on the first pass's text
    # (``calibrate_steps`` Adam steps) and a second pass runs on it (0 steps: one pass only).
    calibrate_steps: int = 0
    calibrate_below: float = 0.995
    # The same drift estimate, fitted once (``calibrate_early`` Adam steps at ``calibrate_early_lr``) on the
    # search's positions after the early ones, where its mean score is below ``calibrate_below``, and used to
    # re-decide the early positions and near-ties (0: the reference head as it is). Measured on Gemma 3 at k = 8
    # (BENCHMARKS, "Prefix inversion at full strength on Gemma 3"): under the drift, the public head preferred a
    # related wrong word at the first positions after <bos>; the calibrated head does not.
    calibrate_early: int = 20
    calibrate_early_lr: float = 2.5e-3

    def __post_init__(self) -> None:
        if self.calibrate_steps < 0 or self.calibrate_early < 0:
            raise ValueError("calibrate_steps and calibrate_early must be >= 0")
        if not self.calibrate_early_lr > 0:
            raise ValueError("calibrate_early_lr must be > 0")
        if self.candidates < 1 or self.beam < 1:
            raise ValueError("candidates and beam must be >= 1")
        knobs = (self.widen, self.widen_rounds, self.first_widen, self.prior, self.relax_steps, self.tie_margin,
                 self.early_positions, self.fuse, self.self_train_every)
        if min(knobs) < 0:
            raise ValueError("widen, widen_rounds, first_widen, prior, relax_steps, tie_margin, early_positions, "
                             "fuse and self_train_every must be >= 0")
        if not -1.0 <= self.self_train_above <= 1.0:
            raise ValueError("self_train_above must be in [-1, 1] (a cosine score)")
        if self.tie_alternatives < 1:
            raise ValueError("tie_alternatives must be >= 1")
        if not -1.0 <= self.widen_below <= 1.0:
            raise ValueError("widen_below is a cosine score: choose it in [-1, 1]")
        if self.widen_again_below is not None and not -1.0 <= self.widen_again_below <= self.widen_below:
            raise ValueError("widen_again_below is a cosine score: choose it in [-1, widen_below] (or none)")
        if not self.rho > 0:
            raise ValueError("rho must be > 0")

    def options(self) -> PrefixOptions:
        """The search as this config sets it."""
        return PrefixOptions(
            candidates=self.candidates, beam=self.beam, widen=self.widen, widen_rounds=self.widen_rounds,
            widen_below=self.widen_below, widen_again_below=self.widen_again_below, prior=self.prior,
            relax_steps=self.relax_steps, alternatives=self.tie_alternatives, fuse=self.fuse,
            self_train_every=self.self_train_every, self_train_above=self.self_train_above, rho=self.rho,
            adaptive=self.adaptive, use_colluder=self.use_colluder, seed=self.seed, first_widen=self.first_widen,
            early_positions=self.early_positions, tie_margin=self.tie_margin, calibrate_steps=self.calibrate_steps,
            calibrate_below=self.calibrate_below, calibrate_early=self.calibrate_early,
            calibrate_early_lr=self.calibrate_early_lr)


@register_attack("prefix_inversion")
class PrefixInversionAttack(Attack):
    requires = frozenset({Capability.ACTIVATIONS, Capability.BASE_WEIGHTS})
    # the linear proposer is fitted on shadow text (+ a colluder's records); a colluder's head verifies
    uses = frozenset({Capability.SHADOW_DATA, Capability.COLLUDER_WEIGHTS, Capability.COLLUDER_DATA})
    Config = PrefixInversionConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        start, cpu = time.perf_counter(), time.process_time()
        obs = shared_base(obs)
        target, mask = stacked(obs)
        ids, extra = prefix_invert(obs, self.config.options(), target, mask)
        ids = ids.masked_fill(~mask.bool(), obs.tokenizer.pad_token_id or 0)
        extra["seconds"] = time.perf_counter() - start
        extra["cpu_seconds"] = time.process_time() - cpu  # CPU time of this process (wall time suffers contention)
        return Reconstruction(ids, decode_rows(obs.tokenizer, ids, mask), extra=extra)
