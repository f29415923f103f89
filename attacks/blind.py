"""The blind baseline: the best guess of an attacker who observes nothing of the victims but their public
sequence lengths (the padding pattern crosses the wire in clear) and knows public text from the domain.

"Tokens recovered" only means leakage above what such a guess gets: on template-like text (forms, records,
chat preambles) a guess that never looked at the victims already matches many tokens. The matrix runs this
attack on the same records as every other cell and stores each metric's advantage over it.

Candidates, each fitted on public shadow text only:

* ``position_prior``: the most frequent token at each position of the tokenised shadow text;
* ``length_prior``: the same, among shadow sequences of the victim's length (lengths are public), backing
  off to ``position_prior`` where fewer than ``min_count`` shadow sequences have that length;
* ``aligned_prior``: per position, the start-aligned or the end-aligned (counted back from the sequence's
  end) most frequent token, whichever is more frequent there in the shadow text: template sentences share
  their openings and their endings ("... since last month.") while variable-length fields shift the rest;
* ``lm_greedy``: the public LM's most likely text (greedy decoding) from the most frequent first token,
  cut to each length (only with the public weights).

The candidate used is the one with the highest token accuracy on a held-out part of the shadow text
(``holdout`` of it, scored at the held-out sequences' own lengths), refitted on all of it: model selection
on public data only, never on the victims' records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.toolkit.observe import decode_rows, tokenize
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations
from suite.scoring.metrics import token_accuracy


@dataclass(frozen=True)
class BlindConfig(AttackConfig):
    holdout: float = 0.2  # share of the shadow text held out to choose the candidate
    min_count: int = 8  # shadow sequences of one length needed to trust a per-length prior
    candidate: str = "auto"  # "auto" (chosen on held-out shadow text) or one candidate by name

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), not {self.holdout}")
        if self.min_count < 1:
            raise ValueError("min_count must be >= 1")
        if self.candidate not in ("auto", *CANDIDATES):
            raise ValueError(f"candidate must be 'auto' or one of {', '.join(CANDIDATES)}, not {self.candidate!r}")


CANDIDATES = ("position_prior", "length_prior", "aligned_prior", "lm_greedy")


def _mode(ids: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    return _mode_and_share(ids, mask, fallback)[0]


def _mode_and_share(ids: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Most frequent real token at each position [T] (``fallback`` where no sequence has one) and the share
    of the sequences with a real token there that hold it [T]."""
    out, share = fallback.clone(), torch.zeros(ids.shape[1])
    for t in range(ids.shape[1]):
        real = ids[mask[:, t].bool(), t]
        if real.numel():
            values, counts = real.unique(return_counts=True)
            out[t] = values[counts.argmax()]
            share[t] = counts.max() / real.numel()
    return out, share


def _from_end(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens reversed (position 0 = the last real token), padding kept at the end."""
    lengths = mask.sum(1, keepdim=True)
    pos = torch.arange(ids.shape[1])[None]
    src = (lengths - 1 - pos).clamp(min=0)
    return torch.where(pos < lengths, ids.gather(1, src), ids)


class _Priors:
    """Per-position and per-(length, position) token modes of tokenised shadow text."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, min_count: int):
        fill = torch.zeros(ids.shape[1], dtype=torch.long)
        self.position, self.share = _mode_and_share(ids, mask, fill)
        self.end, self.end_share = _mode_and_share(_from_end(ids, mask), mask, fill)
        lengths = mask.sum(1)
        self.by_length = {int(n): _mode(ids[lengths == n], mask[lengths == n], self.position)
                          for n in lengths.unique() if int((lengths == n).sum()) >= min_count}

    def guess(self, candidate: str, lengths: list[int]) -> torch.Tensor:
        if candidate == "position_prior":
            return self.position.expand(len(lengths), -1).clone()
        if candidate == "aligned_prior":
            rows = []
            for n in lengths:
                back = (n - 1 - torch.arange(len(self.position))).clamp(min=0)
                use_end = (self.end_share[back] > self.share) & (torch.arange(len(self.position)) < n)
                rows.append(torch.where(use_end, self.end[back], self.position))
            return torch.stack(rows)
        return torch.stack([self.by_length.get(n, self.position) for n in lengths])


def _greedy(model: torch.nn.Module, first: int, length: int) -> torch.Tensor:
    """The public LM's greedy continuation of ``first`` to ``length`` tokens [length] (transformers'
    ``generate`` with its KV cache; no early stop, so every row has a guess at every position)."""
    ids = torch.tensor([[first]])
    if length <= 1:
        return ids[0]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length - 1,
                             min_new_tokens=length - 1, do_sample=False, pad_token_id=first)
    return out[0, :length]


def held_accuracy(guess: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Token accuracy of ``guess`` on held-out shadow rows (0 where they hold no real token)."""
    return token_accuracy(ids, guess, mask) if mask.any() else 0.0


@register_attack("blind")
class BlindAttack(Attack):
    requires = frozenset({Capability.SHADOW_DATA})
    uses = frozenset({Capability.SHADOW_DATA, Capability.BASE_WEIGHTS})  # the public LM, where granted
    Config = BlindConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        self._greedy_texts: dict[int, torch.Tensor] = {}  # first token -> the public LM's greedy text
        if obs.lengths is None:
            raise ValueError("the blind baseline needs the victims' public sequence lengths (obs.lengths)")
        if not obs.shadow:
            raise ValueError("the blind baseline needs public shadow text")
        lengths = [int(n) for n in obs.lengths]
        ids, mask = tokenize(obs.tokenizer, obs.shadow, obs.max_length)
        candidates = [c for c in CANDIDATES if c != "lm_greedy" or obs.base_model is not None]
        chosen, scores = self.config.candidate, {}
        if chosen == "auto":
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(self.config.seed))
            cut = max(1, int(round(len(ids) * self.config.holdout)))
            held, fit = order[:cut], order[cut:] if len(ids) > cut else order
            scores = {c: held_accuracy(self._guess(c, obs, ids[fit], mask[fit], [int(n) for n in mask[held].sum(1)]),
                                   ids[held], mask[held]) for c in candidates}
            chosen = max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
        guess = self._guess(chosen, obs, ids, mask, lengths)
        real = (torch.arange(obs.max_length)[None] < torch.tensor(lengths)[:, None]).long()
        note = f"blind guess: {chosen}" + (
            f" (held-out shadow token accuracy {', '.join(f'{c} {s:.3f}' for c, s in scores.items())})" if scores else "")
        return Reconstruction(guess, decode_rows(obs.tokenizer, guess, real), note=note,
                              extra={"candidate": chosen, "holdout_scores": scores})

    def _guess(self, candidate: str, obs: Observations, ids: torch.Tensor, mask: torch.Tensor,
               lengths: list[int]) -> torch.Tensor:
        priors = _Priors(ids, mask, self.config.min_count)
        if candidate != "lm_greedy":
            return priors.guess(candidate, lengths)
        if obs.base_model is None:
            raise ValueError("candidate 'lm_greedy' needs the public base weights")
        first = int(priors.position[0])
        if first not in self._greedy_texts:  # the same text for selection and guess: decode it once
            self._greedy_texts[first] = _greedy(obs.base_model().eval(), first, obs.max_length)
        return self._greedy_texts[first].expand(len(lengths), -1).clone()
