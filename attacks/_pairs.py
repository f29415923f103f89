"""Shadow training pairs for the inverters (``learned_inversion``, ``prefix_inversion``'s proposer): every
available head (the public one, a colluder's fine-tuned one) over every available text (public shadow text, a
colluder's records), and the closed-form ridge solve they are fitted with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks._common import public_head, run_head
from suite.engine.split import ClientHead
from suite.interfaces.threats import Observations


@dataclass
class _Pairs:
    """Training pairs: head outputs [N, T, H], their tokens [N, T] and padding mask [N, T]."""

    feats: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    sources: dict[str, int]  # "head x texts" -> sequences contributed


def _tokenize(obs: Observations, texts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # As the clients tokenise (suite.experiment.data.tokenize): right padding to max_length, so position t means the same
    # thing in the shadow pairs and in the victims' traffic.
    enc = obs.tokenizer(list(texts), padding="max_length", truncation=True, max_length=obs.max_length,
                        padding_side="right", return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def training_pairs(obs: Observations, use_colluder: bool = True,
                   known: dict[str, torch.Tensor] | None = None) -> tuple[_Pairs, ClientHead]:
    """Every available head over every available text (see the module docstring). Also returns the public
    head, whose input embedding is the decoding table. ``known``: head outputs a caller already computed, by
    source ("colluder x shadow"), used instead of running that head again."""
    base = public_head(obs)
    heads: list[tuple[str, nn.Module]] = [("base", base)]
    corpora: list[tuple[str, tuple[str, ...]]] = [("shadow", tuple(obs.shadow or ()))]
    if use_colluder and obs.colluder_head_tail is not None:
        colluder_head, _ = obs.colluder_head_tail()
        colluder_head.requires_grad_(False)
        heads.append(("colluder", colluder_head.eval()))
    if use_colluder and obs.colluder_records:
        corpora.append(("colluder_records", tuple(obs.colluder_records)))
    feats, ids, masks, sources = [], [], [], {}
    for text_name, texts in corpora:
        if not texts:
            continue
        tok_ids, tok_mask = _tokenize(obs, texts)
        for head_name, head in heads:
            source = f"{head_name} x {text_name}"
            done = (known or {}).get(source)
            feats.append(done if done is not None else run_head(head, tok_ids, tok_mask))
            ids.append(tok_ids)
            masks.append(tok_mask)
            sources[source] = tok_ids.shape[0]
    if not feats:
        raise ValueError("learned_inversion needs shadow text (or colluder records) to train on")
    return _Pairs(torch.cat(feats), torch.cat(ids), torch.cat(masks), sources), base


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float, extra_diag: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W |x W - y|^2 + lam' |W|^2 (+ the expected noise term), in float64; lam' = lam * mean diag."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    if extra_diag is not None:
        gram = gram + torch.diag(extra_diag.double())
    return ridge_solve(gram, x.T @ y, lam)


def ridge_solve(gram: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """``_ridge`` from its normal equations (float64 ``x^T x``, ``x^T y``): solved with lam' = lam * mean diag."""
    gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype) * (lam * gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram, xty).float()
