"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much more likely a model view finds each
canary's secret than random secrets of the same format.

Each canary text and ``candidates`` texts with secrets drawn uniformly from the public format (fresh from the
attack's seed, the prefix the same) are scored by their log-perplexity under the view: the summed negative
log-likelihood over every position (the shared prefix adds the same to all). By default the prefix the texts
share is run once and its KV cache reused for every candidate's secret (``attacks.toolkit.memorise.cached_prefix_lppl``: the
same values as the plain batched forward, ``prefix_cache = false``, at a fraction of the positions). Exposure, in bits, is
``-log2`` of the skew-normal CDF fitted to the candidates at the canary's value
(``suite.scoring.memorisation.exposure``, which the runner applies to the scores this attack returns); the
rank among the sampled candidates is kept as a check. A secret space no larger than ``candidates`` (a 4-digit
``[data] canaries.format``: 10^4 secrets) is scored whole instead, and exposure is Carlini et al.'s exact
``log2 |R| - log2 rank``, capped at ``log2 |R|`` (13.3 bits for 4 digits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from attacks.toolkit.memorise import VIEW_CAPABILITIES, ViewConfig, cached_prefix_lppl, open_view, token_stats
from suite.interfaces.attack import Attack, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

MIN_CANDIDATES = 10_000  # Carlini et al. fit the skew-normal on at least this many sampled candidates


@dataclass(frozen=True)
class CanaryExposureConfig(ViewConfig):
    candidates: int = MIN_CANDIDATES  # secrets sampled from the format for the skew-normal fit (>= 10^4)
    batch_size: int = 128
    prefix_cache: bool = True  # the shared prefix's KV computed once (False: every text run whole)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates < MIN_CANDIDATES:
            raise ValueError(f"candidates must be >= {MIN_CANDIDATES} (Carlini et al.'s fit), got {self.candidates}")


def _secret(rng: random.Random, fmt: str) -> str:
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in fmt)


def _fill(fmt: str, digits: str) -> str:
    it = iter(digits)
    return "".join(next(it) if ch == "#" else ch for ch in fmt)


@register_attack("canary_exposure")
class CanaryExposureAttack(Attack):
    requires_any = VIEW_CAPABILITIES
    uses = frozenset({Capability.BASE_WEIGHTS})
    audits = frozenset({"canaries"})
    scored_on_canaries = True  # the runner refuses a run without canaries (suite.experiment.memorisation)
    Config = CanaryExposureConfig
    kind = "memorisation"

    def reconstruct(self, obs: Observations) -> Reconstruction:
        audit = obs.audit
        if audit is None or not audit.canaries:
            raise ValueError("canary_exposure needs canaries: add [data] canaries = { count = 20, repeats = [1, 10, 50] }")
        view = open_view(obs, self.config.view)
        digits = audit.secret_format.count("#")
        whole = 10 ** digits <= self.config.candidates  # a space this small is ranked whole, exactly
        if whole:
            secrets = (_fill(audit.secret_format, f"{i:0{digits}d}") for i in range(10 ** digits))
        else:
            rng = random.Random(f"canary candidates {self.config.seed}")
            secrets = (_secret(rng, audit.secret_format) for _ in range(self.config.candidates))
        candidates = [audit.prefix + s for s in secrets]

        def lppl(texts):
            if self.config.prefix_cache:
                return cached_prefix_lppl(view, obs.tokenizer, texts, obs.max_length, self.config.batch_size)
            stats = token_stats(view.logits, obs.tokenizer, texts, obs.max_length, self.config.batch_size)
            return [float(-lp.sum()) for lp in stats.logp]

        cand = lppl(candidates)
        if whole:  # each canary is one of the candidates: its own score, so that its rank is exact
            of = dict(zip(candidates, cand, strict=True))
            mine = [of[t] for t in audit.canaries]
        else:
            mine = lppl(list(audit.canaries))
        # exposure itself is scoring (suite.scoring.memorisation.exposure), computed by the runner
        return Reconstruction(torch.empty(0, dtype=torch.long), (), extra={
            "view": view.name, "canary_lppl": mine, "candidate_lppl": cand, "whole_space": whole})
