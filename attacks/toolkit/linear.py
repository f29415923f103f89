"""The linear inverter: closed-form ridge from standardised head outputs [features, one-hot position, 1] to the
normalised input-embedding row of the token at that position, and the shadow training pairs it is fitted on.

Training pairs, "every available head over every available text" (``training_pairs``): the public head, plus a
colluder's fine-tuned head where granted, over the public shadow text, plus a colluder's own records. Features
are standardised per hidden dimension so the few "massive activation" dimensions of pretrained LMs do not
dominate. ``LinearInverter`` is used by ``learned_inversion`` (mode "linear"), and as the candidate proposer
of the prefix search, which also self-trains it on the victims' recovered pairs (``add``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.toolkit.decoding import cosine_topk
from attacks.toolkit.observe import colluder_parts, public_head, run_head, token_embeddings, tokenize
from suite.engine.split import ClientHead
from suite.interfaces.threats import Observations


@dataclass
class TrainingPairs:
    """Training pairs: head outputs [N, T, H], their tokens [N, T] and padding mask [N, T]."""

    feats: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    sources: dict[str, int]  # "head x texts" -> sequences contributed


def pair_source(head: str, texts: str = "shadow") -> str:
    """The name ``training_pairs`` gives the pairs of ``head`` ("base" or "colluder") over ``texts``."""
    return f"{head} x {texts}"


def training_pairs(obs: Observations, use_colluder: bool = True,
                   known: dict[str, torch.Tensor] | None = None) -> tuple[TrainingPairs, ClientHead]:
    """Every available head over every available text (see the module docstring). Also returns the public
    head, whose input embedding is the decoding table. ``known``: head outputs a caller already computed, by
    source (``pair_source``), used instead of running that head again."""
    base = public_head(obs)
    heads: list[tuple[str, nn.Module]] = [("base", base)]
    corpora: list[tuple[str, tuple[str, ...]]] = [("shadow", tuple(obs.shadow or ()))]
    colluder = colluder_parts(obs) if use_colluder else None
    if colluder is not None:
        heads.append(("colluder", colluder[0]))
    if use_colluder and obs.colluder_records:
        corpora.append(("colluder_records", tuple(obs.colluder_records)))
    feats, ids, masks, sources = [], [], [], {}
    for text_name, texts in corpora:
        if not texts:
            continue
        tok_ids, tok_mask = tokenize(obs.tokenizer, texts, obs.max_length)
        for head_name, head in heads:
            source = pair_source(head_name, text_name)
            done = (known or {}).get(source)
            feats.append(done if done is not None else run_head(head, tok_ids, tok_mask))
            ids.append(tok_ids)
            masks.append(tok_mask)
            sources[source] = tok_ids.shape[0]
    if not feats:
        raise ValueError("the linear inverter needs shadow text (or colluder records) to train on")
    return TrainingPairs(torch.cat(feats), torch.cat(ids), torch.cat(masks), sources), base


def standardiser(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and spread of ``flat`` [M, H]; the spread is floored at 1 % of its median so a dead
    dimension does not blow up."""
    mu, sd = flat.mean(0), flat.std(0)
    return mu, sd.clamp_min(float(sd.median()) * 1e-2 + 1e-6)


def design(x: torch.Tensor, length: int, positions: torch.Tensor | None = None, position: bool = True) -> torch.Tensor:
    """Standardised outputs [..., H] at ``positions`` (default: their index along dim -2) -> the inverter's
    features [..., H (+ length) + 1]: the outputs, a one-hot position (``position``), a constant 1."""
    parts = [x]
    if position:
        if positions is None:
            positions = torch.arange(x.shape[-2]).expand(*x.shape[:-1])
        parts.append(F.one_hot(positions.clamp_max(length - 1), length).to(x.dtype))
    parts.append(torch.ones(*x.shape[:-1], 1))
    return torch.cat(parts, -1)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float, extra_diag: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W |x W - y|^2 + lam' |W|^2 (+ the expected noise term), in float64; lam' = lam * mean diag."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    if extra_diag is not None:
        gram = gram + torch.diag(extra_diag.double())
    return ridge_solve(gram, x.T @ y, lam)


def ridge_solve(gram: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """``ridge`` from its normal equations (float64 ``x^T x``, ``x^T y``): solved with lam' = lam * mean diag."""
    gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype) * (lam * gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram, xty).float()


def noise_diag(n: int, noise: torch.Tensor, width: int) -> torch.Tensor:
    """The Gram matrix's expected noise term for ``n`` pairs whose first ``len(noise)`` features carry
    independent noise of std ``noise``: E[(X+N)^T (X+N)] = X^T X + n diag(var N)."""
    extra = torch.zeros(width)
    extra[: noise.shape[-1]] = n * noise**2
    return extra


def fit_ridge_map(x: torch.Tensor, real: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, position: bool,
                  lam: float) -> torch.Tensor:
    """The ridge map [F, E] from standardised ``x`` [N, T, H] (``design`` features, real positions only) onto
    ``targets`` [N, T, E], with Gaussian feature noise of std ``noise`` [H] in expectation."""
    feats = design(x, x.shape[1], position=position)[real]
    return ridge(feats, targets[real], lam, noise_diag(feats.shape[0], noise, feats.shape[1]))


class LinearInverter:
    """Ridge from standardised [features, one-hot position, 1] to the normalised input-embedding row, fitted on
    ``feats`` [N, T, H] / ``ids`` / ``mask`` pairs against ``table`` [V, E]. ``predict`` gives embedding-space
    vectors; called on targets [N, T, H] it returns their top-``k`` tokens by cosine [N, T, k].

    ``add`` self-trains it: pairs of an observed output and the token recovered there join the normal
    equations and the ridge is solved again. The victims' text and their fine-tuned head differ from the
    shadow text and the public head it was fitted on (the domain, and the drift); their own recovered pairs
    carry both. Measured on Gemma 3 at k = 8 (BENCHMARKS.md): with the first 8 positions' pairs, the
    true token is in the top 32 at 82 % of the later positions, against 66 % from the shadow pairs alone."""

    def __init__(self, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, k: int = 1,
                 lam: float = 1e-2, position: bool = True, noise_sigma: float = 0.0):
        real = mask.bool()
        self.mu, self.sd = standardiser(feats[real].float())
        self.length, self.k, self.lam, self.position = feats.shape[1], k, lam, position
        self.rows = F.normalize(table.float(), dim=-1)  # [V, E]
        x = self.features(feats.float())[real].double()
        self.gram, self.xty = x.T @ x, x.T @ self.rows[ids[real]].double()
        self.extra = noise_diag(x.shape[0], noise_sigma / self.sd, x.shape[1]).double() if noise_sigma else None
        self.added = 0
        self._solve()

    def features(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] outputs at ``positions`` (default: their index along dim -2 of [N, T, H]) -> features."""
        return design((x - self.mu) / self.sd, self.length, positions, self.position)

    def _solve(self) -> None:
        gram = self.gram if self.extra is None else self.gram + torch.diag(self.extra)
        self.w = ridge_solve(gram, self.xty, self.lam)

    def add(self, feats: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, weight: float = 1.0) -> None:
        """Self-training: pairs (output [M, H] at ``positions`` [M], token ``ids`` [M]) join the fit."""
        if ids.numel() == 0:
            return
        x = self.features(feats.float(), positions).double()
        self.gram += weight * (x.T @ x)
        self.xty += weight * (x.T @ self.rows[ids].double())
        self.added += int(ids.numel())
        self._solve()

    def predict(self, target: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted (unnormalised) embedding-space vectors [..., E] of outputs ``target`` [..., H]."""
        return self.features(target.float(), positions) @ self.w

    def similarities(self, target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cosine [R, V] of every vocabulary row with the predicted embedding of ``target`` [R, H] at
        ``positions`` [R]."""
        return F.normalize(self.predict(target, positions), dim=-1) @ self.rows.T

    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        n, length = target.shape[:2]
        out = torch.empty(n, length, self.k, dtype=torch.long)
        for i in range(n):
            out[i] = cosine_topk(self.predict(target[i], torch.arange(length)), self.rows, self.k, chunk=None,
                                 unit_rows=True)[1]
        return out


def fit_linear_inverter(obs: Observations, k: int, lam: float = 1e-2, known: dict[str, torch.Tensor] | None = None
                        ) -> LinearInverter:
    """``LinearInverter`` on ``training_pairs`` (the colluder's head and records where granted). ``known``: head
    outputs on shadow text already computed. ``inverter(target [N, T, H]) -> [N, T, k]``."""
    pairs, base = training_pairs(obs, use_colluder=True, known=known)
    return LinearInverter(pairs.feats, pairs.ids, pairs.mask, token_embeddings(base), k, lam)
