"""Extraction: continue the canaries' public prefix with the model view and count the secrets that come out
verbatim. Greedy decoding gives one continuation, beam search ``beams`` more (every final beam kept); the
runner counts the canaries whose secret appears in any of them (the attack never sees the secrets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.toolkit.memorise import (
    VIEW_CAPABILITIES,
    ViewConfig,
    beam_continuations,
    format_pattern,
    open_view,
)
from suite.interfaces.attack import Attack, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations


@dataclass(frozen=True)
class ExtractionConfig(ViewConfig):
    beams: int = 16  # beam width; every final beam is a guess (greedy decoding is always tried too)
    extra_tokens: int = 2  # decoded beyond the token count of a secret of the format

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beams < 1 or self.extra_tokens < 0:
            raise ValueError("beams must be >= 1 and extra_tokens >= 0")


@register_attack("extraction")
class ExtractionAttack(Attack):
    requires_any = VIEW_CAPABILITIES
    uses = frozenset({Capability.BASE_WEIGHTS})
    audits = frozenset()  # the prefix and the format only
    scored_on_canaries = True  # the runner refuses a run without canaries (suite.experiment.memorisation)
    Config = ExtractionConfig
    kind = "memorisation"

    def reconstruct(self, obs: Observations) -> Reconstruction:
        if obs.audit is None:
            raise ValueError("extraction needs canaries: add [data] canaries = { count = 20, repeats = [1, 10, 50] }")
        view = open_view(obs, self.config.view)
        tok = obs.tokenizer
        # BPE tokenizers attach a space to the word after it ("Ġ4"): decode from the prefix without its
        # trailing space, or the first digit would have to follow a bare-space token the model never saw
        prompt = obs.audit.prefix.rstrip()
        example = obs.audit.secret_format.replace("#", "0")
        n = (len(tok(obs.audit.prefix + example)["input_ids"]) - len(tok(prompt)["input_ids"])
             + self.config.extra_tokens)
        pattern = format_pattern(obs.audit.secret_format)
        guesses = {}
        for mode, beams in (("greedy", 1), ("beam", self.config.beams)):
            texts = beam_continuations(view, tok, prompt, n, beams)
            guesses[mode] = [m.group(0) for t in texts if (m := pattern.search(t))]
        return Reconstruction(torch.empty(0, dtype=torch.long), (), extra={"view": view.name, "guesses": guesses})
