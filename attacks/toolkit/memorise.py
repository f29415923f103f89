"""Shared pieces of the memorisation attacks: the model view an attack reads, per-token likelihoods under it
(and under the public base model, the reference), and decoding from a prefix.

A view is (head, trunk, tail) run in one place, no wire: ``server_adapters`` composes the server's trunk (with
its adapters) with the public base head and tail; ``colluder_model`` and ``released_model`` come whole.

View selection is defined once: every memorisation attack's config is a ``ViewConfig`` (the ``view`` key and
its check), requires one of ``VIEW_CAPABILITIES``, and opens its view with ``open_view``; the views and the
order ``auto`` tries them are ``suite.interfaces.threats.MODEL_VIEWS`` (the runner runs each granted one).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from attacks.toolkit.observe import public_parts, tokenize
from suite.engine.split import position_ids_for
from suite.errors import ConfigError
from suite.interfaces.attack import AttackConfig
from suite.interfaces.threats import MODEL_VIEWS, Observations, granted_views

VIEWS = MODEL_VIEWS
VIEW_CAPABILITIES = frozenset(MODEL_VIEWS.values())  # a memorisation attack's ``requires_any``


def check_view(view: str) -> None:
    if view != "auto" and view not in VIEWS:
        raise ValueError(f"view must be 'auto' or one of {', '.join(VIEWS)}, not {view!r}")


@dataclass(frozen=True)
class ViewConfig(AttackConfig):
    """The view key every memorisation attack takes: released_model | colluder_model | server_adapters | auto
    (every granted view; the runner reports the one that reads most)."""

    view: str = "auto"

    def __post_init__(self) -> None:
        check_view(self.view)


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
    granted = {name: getattr(obs, name) for name in granted_views(obs)}
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


@torch.no_grad()
def cached_prefix_lppl(view: View, tokenizer, texts: list[str], max_length: int, batch_size: int = 128,
                       max_nodes: int = 1024) -> list[float]:
    """Each text's log-perplexity under ``view`` (the summed negative log-likelihood of every next token, as
    ``token_stats`` gives it), computing every shared token prefix once: canary candidates differ only in the
    secret. Texts are grouped by token count. A group's common prefix runs through the head, trunk and tail
    once, filling each part's KV cache; then the prefix tree of the secrets' first tokens is walked a level at a
    time while a level has at most ``max_nodes`` distinct prefixes (each node one token on its parent's cache:
    10, 100, 1,000 nodes for the first three digits), and the rest of each text runs in batches on its deepest
    node's cache, without the last token (nothing after it is scored). A space small enough to enumerate (4
    digits: 1,111 token positions for 10^4 secrets) is then scored almost entirely in the tree; a sampled
    12-digit one still skips the prefix and the first digits. A group with no common prefix is scored plainly."""
    ids_of = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    out: list[float] = [0.0] * len(texts)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(ids_of):
        groups.setdefault(len(ids), []).append(i)
    parts = (view.head, view.trunk, view.tail)
    for length, index in groups.items():
        rows = torch.tensor([ids_of[i] for i in index], dtype=torch.long)
        p = min(int((rows == rows[0]).all(0).long().cumprod(0).sum()), length - 1)
        if p < 1:
            plain = token_stats(view.logits, tokenizer, [texts[i] for i in index], max_length, batch_size)
            for i, lp in zip(index, plain.logp, strict=True):
                out[i] = float(-lp.sum())
            continue
        caches = [DynamicCache(config=part.blocks.config) for part in parts]
        logp = F.log_softmax(_run(parts, caches, rows[:1, :p], 0)[0].float(), -1)  # [p, V]
        nll = (-logp[torch.arange(p - 1), rows[0, 1:p]].sum()).expand(len(index)).clone()
        node = torch.zeros(len(index), dtype=torch.long)  # each text's deepest node so far (row of ``caches``)
        after = logp[-1:]  # [nodes, V]: the next-token distribution at each node
        depth = p  # tokens the nodes hold
        while depth < length - 1:
            keys, parent = torch.unique(torch.stack([node, rows[:, depth]], 1), dim=0, return_inverse=True)
            if keys.shape[0] > max_nodes:
                break
            nll -= after[node, rows[:, depth]]
            caches = _expand(caches, keys[:, 0])
            after = F.log_softmax(_run(parts, caches, keys[:, 1:], depth)[:, -1].float(), -1)
            node, depth = parent, depth + 1
        nll -= after[node, rows[:, depth]]  # the first token not in the tree
        if length - depth > 1:
            for lo in range(0, len(index), batch_size):
                batch = slice(lo, lo + batch_size)
                mine = _expand(caches, node[batch])
                lp = F.log_softmax(_run(parts, mine, rows[batch, depth:-1], depth).float(), -1)
                nll[batch] -= lp.gather(-1, rows[batch, depth + 1:].unsqueeze(-1)).squeeze(-1).sum(1)
        for i, v in zip(index, nll.tolist(), strict=True):
            out[i] = float(v)
    return out


def _expand(caches: list[DynamicCache], rows: torch.Tensor) -> list[DynamicCache]:
    """Copies of the parts' caches holding the given batch rows (a row may repeat)."""
    out = []
    for c in caches:
        mine = copy.copy(c)
        mine.layers = [copy.copy(layer) for layer in c.layers]
        for layer in mine.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        out.append(mine)
    return out


def _run(parts, caches, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of ``ids`` (positions ``start``..) through head, trunk and tail, each extending its KV cache."""
    b, n = ids.shape
    mask = torch.ones(b, start + n, dtype=torch.long)
    pos = torch.arange(start, start + n).unsqueeze(0).expand(b, n)
    head, trunk, tail = parts
    hidden = head(ids, mask, pos, cache=caches[0])
    hidden = trunk(hidden, mask, pos, cache=caches[1])
    return tail(hidden, mask, pos, cache=caches[2])


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
