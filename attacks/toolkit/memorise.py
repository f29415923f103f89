"""Shared pieces of the memorisation attacks: the model view an attack reads, per-token likelihoods under it
(and under the public base model, the reference), and decoding from a prefix.

A view is (head, trunk, tail) run in one place, no wire: ``server_adapters`` composes the server's trunk (with
its adapters) with the public base head and tail; ``colluder_model`` and ``released_model`` come whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.toolkit.observe import public_parts, tokenize
from suite.engine.split import position_ids_for
from suite.errors import ConfigError
from suite.interfaces.threats import Capability, Observations

# the views; "auto" alone opens the first granted (the runner, suite.experiment.memorisation, runs each)
VIEWS = {"released_model": Capability.RELEASED_MODEL, "colluder_model": Capability.COLLUDER_MODEL,
         "server_adapters": Capability.SERVER_ADAPTERS}


def check_view(view: str) -> None:
    if view != "auto" and view not in VIEWS:
        raise ValueError(f"view must be 'auto' or one of {', '.join(VIEWS)}, not {view!r}")


@dataclass
class View:
    name: str
    head: torch.nn.Module
    trunk: torch.nn.Module
    tail: torch.nn.Module

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = position_ids_for(mask)
        return self.tail(self.trunk(self.head(ids, mask, pos), mask, pos), mask, pos).float()


def open_view(obs: Observations, view: str) -> View:
    """The model the threat grants under ``view`` ("auto": the first granted; the runner tries each)."""
    granted = {name: getattr(obs, name) for name in VIEWS if getattr(obs, name) is not None}
    name = next(iter(granted), None) if view == "auto" else view
    if name is None or name not in granted:
        want = ", ".join(VIEWS) if view == "auto" else view
        raise ConfigError(f"threat {obs.threat.name!r} grants no model view ({want}); use a threat that does, "
                          "e.g. adapter_thief or model_user")
    if name == "server_adapters":
        if obs.base_model is None:
            raise ConfigError("the server_adapters view needs the public base weights (base_weights)")
        base = public_parts(obs)  # the public head and tail
        return View(name, base.head, obs.server_adapters(), base.tail)
    head, trunk, tail = granted[name]()
    return View(name, head, trunk, tail)


@dataclass
class TokenStats:
    """Per text: the log-probability of each real next token, and (Min-K%++) the mean and standard deviation
    of the log-probability under the model's own next-token distribution at that position."""

    logp: list[torch.Tensor]
    mu: list[torch.Tensor]
    sigma: list[torch.Tensor]


def token_stats(logits_of, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> TokenStats:
    """``logits_of(ids, mask) -> [B, T, V]`` scored on ``texts`` in batches."""
    logp_all, mu_all, sigma_all = [], [], []
    for lo in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[lo: lo + batch_size], max_length, longest=True)
        with torch.no_grad():
            logprobs = F.log_softmax(logits_of(ids, mask)[:, :-1].float(), -1)
        target = ids[:, 1:]
        lp = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        probs = logprobs.exp()
        mu = (probs * logprobs).sum(-1)
        sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
        real = mask[:, 1:].bool()
        for i in range(ids.shape[0]):
            logp_all.append(lp[i][real[i]])
            mu_all.append(mu[i][real[i]])
            sigma_all.append(sigma[i][real[i]])
    return TokenStats(logp_all, mu_all, sigma_all)


def base_logits(obs: Observations):
    """The public base model's logits (the reference), or None without the base weights."""
    if obs.base_model is None:
        return None
    model = obs.base_model().float().eval().requires_grad_(False)

    def logits(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    return logits


def format_pattern(fmt: str) -> re.Pattern:
    """A regex for secrets of ``fmt`` (``#`` a digit, anything else literal)."""
    return re.compile("".join(r"\d" if ch == "#" else re.escape(ch) for ch in fmt))


@torch.no_grad()
def beam_continuations(view: View, tokenizer, prefix: str, new_tokens: int, beams: int) -> list[str]:
    """The ``beams`` best continuations of ``prefix`` (beam search on summed log-probability; ``beams = 1`` is
    greedy decoding), decoded without the prefix. Recomputes the whole sequence per step (no KV cache: the
    split parts take whole sequences)."""
    prefix_ids = tokenizer(prefix, return_tensors="pt")["input_ids"].long()
    seqs = prefix_ids
    scores = torch.zeros(1)
    for _ in range(new_tokens):
        mask = torch.ones_like(seqs)
        logp = F.log_softmax(view.logits(seqs, mask)[:, -1], -1)
        total = (scores.unsqueeze(1) + logp).flatten()
        top = total.topk(min(beams, total.numel()))
        vocab = logp.shape[1]
        seqs = torch.cat([seqs[top.indices // vocab], (top.indices % vocab).unsqueeze(1)], 1)
        scores = top.values
    return [tokenizer.decode(s[prefix_ids.shape[1]:], skip_special_tokens=True) for s in seqs]
