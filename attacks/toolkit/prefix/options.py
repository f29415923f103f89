"""Every knob of the prefix search, in one object: ``prefix_inversion`` and ``bisr`` each build it from their
own config (``PrefixInversionConfig.options()``, ``BiSRConfig.options()``), and the search, the refinement
and the calibration read it. The defaults are the bare search: no LM prior, no continuous step, no
re-deciding, no calibration."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixOptions:
    # -- the search (``PrefixSearch``) --
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
    # With a ``LinearInverter`` handed to ``PrefixSearch.run``: ``fuse`` > 0 adds the top ``candidates`` tokens of
    # the public LM's log-probability given the recovered prefix + ``fuse`` x the proposer's cosine (a product of
    # experts) to the proposer's own; every ``self_train_every`` positions the proposer is refitted with the
    # recovered tokens that matched at least ``self_train_above`` (weight ``self_train_weight`` per pair).
    fuse: float = 0.0
    self_train_every: int = 0
    self_train_above: float = 0.8
    self_train_weight: float = 4.0
    # -- the score (``Scorer``) and what the attacker verifies on --
    rho: float = 1.0  # drift allowance: weight of the head's own spread in the score's per-dimension scale
    adaptive: bool = True  # measure the deployed defense's noise on the attacker's simulation and weight by it
    use_colluder: bool = True  # verify on the colluder's fine-tuned head where granted
    seed: int = 0  # the attacker's own randomness (the simulation's)
    # -- re-deciding with what follows (``refine``) --
    first_widen: int = 0  # gradient-ranked whole-vocabulary candidates for the early positions (0: proposer's only)
    early_positions: int = 1  # the first positions re-decided (position 0 always; the later ones where poor)
    tie_margin: float = 0.0  # re-decide runner-ups within this score of the choice (0: off)
    # -- the drift estimate (``calibrate``) --
    calibrate_steps: int = 0  # a second pass on a calibrated head (0: one pass only)
    calibrate_below: float = 1.0  # ... only where the first pass's mean score stays below this
    calibrate_early: int = 0  # a calibrated head for the early positions and near-ties (0: the reference head)
    calibrate_early_lr: float = 2.5e-3


@contextmanager
def timed(seconds: dict, phase: str):
    """Adds the wall seconds of the block to ``seconds[phase]`` (where an attack's time goes)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start
