"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much more likely a model view finds each
canary's secret than random secrets of the same format.

Each canary text and ``candidates`` texts with secrets drawn uniformly from the public format (fresh from the
attack's seed, the prefix the same) are scored by their log-perplexity under the view: the summed negative
log-likelihood over every position (the shared prefix adds the same to all). Exposure, in bits, is
``-log2`` of the skew-normal CDF fitted to the candidates at the canary's value
(``suite.scoring.memorisation.exposure``, which the runner applies to the scores this attack returns); the
rank among the sampled candidates is kept as a check.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from attacks.toolkit.memorise import check_view, open_view, token_stats
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

MIN_CANDIDATES = 10_000  # Carlini et al. fit the skew-normal on at least this many sampled candidates


@dataclass(frozen=True)
class CanaryExposureConfig(AttackConfig):
    view: str = "auto"  # released_model | colluder_model | server_adapters | auto (every granted view, the runner reports the max)
    candidates: int = MIN_CANDIDATES  # secrets sampled from the format for the skew-normal fit (>= 10^4)
    batch_size: int = 128

    def __post_init__(self) -> None:
        check_view(self.view)
        if self.candidates < MIN_CANDIDATES:
            raise ValueError(f"candidates must be >= {MIN_CANDIDATES} (Carlini et al.'s fit), got {self.candidates}")


def _secret(rng: random.Random, fmt: str) -> str:
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in fmt)


@register_attack("canary_exposure")
class CanaryExposureAttack(Attack):
    requires_any = frozenset({Capability.SERVER_ADAPTERS, Capability.COLLUDER_MODEL, Capability.RELEASED_MODEL})
    uses = frozenset({Capability.BASE_WEIGHTS})
    audits = frozenset({"canaries"})
    Config = CanaryExposureConfig
    kind = "memorisation"

    def reconstruct(self, obs: Observations) -> Reconstruction:
        audit = obs.audit
        if audit is None or not audit.canaries:
            raise ValueError("canary_exposure needs canaries: add [data] canaries = { count = 20, repeats = [1, 10, 50] }")
        view = open_view(obs, self.config.view)
        rng = random.Random(f"canary candidates {self.config.seed}")
        candidates = [audit.prefix + _secret(rng, audit.secret_format) for _ in range(self.config.candidates)]

        def lppl(texts):
            stats = token_stats(view.logits, obs.tokenizer, texts, obs.max_length, self.config.batch_size)
            return [float(-lp.sum()) for lp in stats.logp]

        cand = lppl(candidates)
        mine = lppl(list(audit.canaries))
        # exposure itself is scoring (suite.scoring.memorisation.exposure), computed by the runner
        return Reconstruction(torch.empty(0, dtype=torch.long), (), extra={
            "view": view.name, "canary_lppl": mine, "candidate_lppl": cand})
