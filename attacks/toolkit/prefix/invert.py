"""``prefix_invert``: the prefix search as an attack on observed head outputs, every step fed by one
``PrefixOptions``: the reference head and scorer, the linear proposer, the search, an optional calibrated
second pass, then the early positions and near-ties re-decided."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from attacks.toolkit.linear import LinearInverter, fit_linear_inverter, pair_source
from attacks.toolkit.observe import (
    known_prefix,
    reference_parts,
    run_head,
    shadow_batch,
    start_token,
    token_embeddings,
)
from attacks.toolkit.prefix.calibrate import calibrate
from attacks.toolkit.prefix.options import PrefixOptions, timed
from attacks.toolkit.prefix.refine import first_candidates, refine_first, refine_ties
from attacks.toolkit.prefix.scorer import Scorer
from attacks.toolkit.prefix.search import PrefixSearch
from attacks.toolkit.simulate import defense_noise
from suite.engine.split import ClientHead


def prefix_invert(obs, opt: PrefixOptions, target: torch.Tensor, mask: torch.Tensor, bonus: torch.Tensor | None = None,
                  more: torch.Tensor | None = None, head: ClientHead | None = None) -> tuple[torch.Tensor, dict]:
    """The search on ``target`` [N, T, H] (observed head outputs), as ``opt`` says. ``bonus`` [N, T, V]: other
    evidence added to every candidate's score; ``more`` [N, T, M]: extra candidate tokens. ``head``: what the
    observation is the output of, when it is not the client head's (e.g. ``attacks.kv_inversion.KvReadout``, a
    block's cached keys and values): candidates are verified on it and the proposer is fitted on its outputs
    over the shadow text alone; the defense is simulated on the public client head and carried through
    ``head.after_head(release, mask)`` (not simulated where ``head`` has none).
    Returns token ids [N, T] and diagnostics."""
    seconds: dict[str, float] = defaultdict(float)
    setup = time.perf_counter()
    parts = reference_parts(obs, opt.use_colluder and head is None)  # the head verified on, and the public LM
    own = head is not None
    head, config, lm = head if own else parts.head, parts.model.config, parts.model
    shadow = shadow_batch(obs)
    after = getattr(head, "after_head", None) if own else None
    extra: dict = {"reference": "readout" if own else parts.source,
                   "adaptive": bool(opt.adaptive and obs.defense is not None and (not own or after is not None))}
    noise = None
    if extra["adaptive"] and shadow is not None:
        noise, info = defense_noise(obs, parts.head if own else head, *shadow, seed=opt.seed, then=after)
        extra.update(info)
    known = {}
    if shadow is not None:
        outputs = run_head(head, *shadow)
        known[pair_source(parts.source)] = outputs  # the proposer's training pairs too
        scorer = Scorer.fit(outputs, shadow[1], noise, opt.rho)
    else:
        scorer = Scorer.fit(target, mask, noise, opt.rho)
    proposals, propose = None, None
    # Proposing position by position (fused with the LM, self-trained on the recovered pairs) or once up front.
    online = opt.fuse > 0 or opt.self_train_every > 0
    if obs.shadow:
        top = min(opt.candidates, head.embed.num_embeddings)
        propose = (LinearInverter(outputs, *shadow, token_embeddings(head), top) if own
                   else fit_linear_inverter(obs, top, known=known))
        proposals = None if online else propose(target)
    if more is not None:
        proposals = more if proposals is None else torch.cat([proposals, more], -1)
    search = PrefixSearch(head, config, scorer, opt, lm, start_token(obs.tokenizer))
    seconds["setup"] = time.perf_counter() - setup  # reference head, scorer, proposer and its proposals
    known = known_prefix(obs.tokenizer)
    extra["known_prefix"] = len(known)
    with timed(seconds, "search"):
        ids, scores = search.run(target, mask, proposals, bonus, propose if online else None, known)
    real = mask.bool()
    steps = opt.calibrate_steps
    noisy = noise is not None and float(noise.sum()) > 0  # drowned in defense noise: there is no drift to fit
    match = _forward_mean(scores, ids, bonus, real)  # how well the chosen tokens' outputs match, bonus aside
    if steps > 0 and real.any() and not noisy and match < opt.calibrate_below:
        # Second pass on a reference head calibrated to the victims' drift (see ``calibrate``).
        extra["first_pass_mean_score"] = match
        with timed(seconds, "calibration"):
            tuned = calibrate(head, config, ids.masked_fill(~real, 0), mask, target, scores, scorer, steps)
            first = dict(search.stats)
            search = PrefixSearch(tuned, config, scorer, opt, lm, start_token(obs.tokenizer))
            ids, scores = search.run(target, mask, proposals, bonus, propose if online else None, known)
            match = _forward_mean(scores, ids, bonus, real)
        extra["first_pass"] = first
    if online and propose is not None:  # the early-position step's candidates, from the self-trained proposer
        extra["self_trained_pairs"] = propose.added
        proposals = propose(target) if more is None else torch.cat([propose(target), more], -1)
    # The first positions, re-decided with what follows them (position 0 always; later early positions where
    # the search's own match stayed poor): the proposer's candidates, the search's runner-ups and
    # whole-vocabulary candidates ranked by the gradient of the outputs after them.
    extra["first_tokens_changed"] = extra["early_tokens_changed"] = 0
    first_real = len(known)  # the first searched position (after the known prefix)
    last_early = first_real + opt.early_positions
    decide = search.head  # the head the early positions and near-ties are re-decided on
    if (opt.calibrate_early > 0 and real.any() and not noisy
            and match < opt.calibrate_below):
        # The victims' drift, estimated from the positions after the early ones (whose outputs lean least on
        # the sink and were decided with most context), then used where the public head's drift misleads most.
        with timed(seconds, "early_calibration"):
            later = torch.zeros_like(real)
            later[:, last_early:] = True
            decide = calibrate(search.head, config, ids.masked_fill(~real, 0), mask, target, scores, scorer,
                               opt.calibrate_early, lr=opt.calibrate_early_lr, fit=later)
    early = time.perf_counter()
    for t in range(first_real, min(last_early, ids.shape[1])):
        rows = (real[:, t] if t == first_real else real[:, t] & (scores[:, t] < opt.widen_below)
                ).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        found = [] if proposals is None else [proposals[rows, t]]
        if t > 0 and search.alternatives is not None:
            found.append(search.alternatives[0][rows, t])
        if opt.first_widen > 0:
            found.append(first_candidates(decide, scorer, target[rows], mask[rows],
                                          ids[rows].masked_fill(~real[rows], 0), opt.first_widen, t=t))
        if found:
            sub = None if bonus is None else bonus[rows]
            new, changed = refine_first(decide, scorer, target[rows], mask[rows], ids[rows],
                                        torch.cat(found, 1), sub, t=t)
            ids[rows] = new
            extra["first_tokens_changed" if t == first_real else "early_tokens_changed"] += changed
    seconds["early_positions"] = time.perf_counter() - early
    margin = opt.tie_margin
    if margin > 0 and search.alternatives is not None:
        with timed(seconds, "ties"):
            ids, extra["ties_changed"] = refine_ties(decide, scorer, target, mask, ids, search.alternatives,
                                                     margin, bonus)
    extra.update(search.stats)
    # Wall seconds by phase; the search's own split (proposals verified, each widening kind, the cache and the
    # LM's prefix extended) is inside "search" and is the last search's (after calibration, the second pass).
    extra["seconds_by_phase"] = {k: round(v, 2) for k, v in {**seconds, **{f"search.{k}": v for k, v in
                                                                          search.seconds.items()}}.items()}
    extra["mean_score"] = match  # the search's (before the early positions and near-ties were re-decided)
    return ids, extra


def _forward_mean(scores: torch.Tensor, ids: torch.Tensor, bonus: torch.Tensor | None,
                  real: torch.Tensor) -> float | None:
    """The mean match of the chosen tokens' outputs alone (the search's scores less the ``bonus`` it added):
    what ``calibrate_below`` and the reported ``mean_score`` compare, with or without other evidence fused in
    (bisr's gradient bonus is <= 0, so the fused mean would fall below the bar however well the outputs match)."""
    if not real.any():
        return None
    forward = scores if bonus is None else scores - bonus.gather(2, ids.unsqueeze(-1)).squeeze(-1)
    return float(forward[real].mean())
