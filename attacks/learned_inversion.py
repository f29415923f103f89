"""Learned inversion of the client head's output: the "vanilla model inversion" of VFLAIR-LLM and the learned
smashed-data inverter of BiSR (Chen et al., CCS 2024), including BiSR's noise-robust variant.

The server knows the public base weights, so it can make its own training pairs: run the public client head
over public shadow text and keep (head output at position t, token t). An inverter fitted on those pairs is
then applied to the victims' captured head outputs. The victims' heads were fine-tuned from the same base
(under LoRA, not far from it), so the inverter transfers. Objective unshifted (position t predicts token t),
padding masked out.

Training pairs, "every available head over every available text":

* heads: the public base head; plus, with ``COLLUDER_WEIGHTS``, the colluding client's fine-tuned head, which
  was trained on the victims' task and so sits closer to the victims' heads than the base does;
* texts: the shadow corpus; plus, with ``COLLUDER_DATA``, the colluder's own private records (in-distribution).

Features are standardised per hidden dimension (mean / std over the training pairs' real positions) so the
few "massive activation" dimensions of pretrained LMs do not dominate. Both modes predict a vector in the
input-embedding space and decode it over the **full** vocabulary by cosine to the public embedding rows
(``nearest_rows``), so tokens never seen in the shadow text (a victim's surname, email handle) can still be
recovered:

* ``mode="linear"``: closed-form ridge regression from [standardised features, one-hot position, 1] onto the
  normalised embedding row of the true token (the "simple probe", in closed form: no training loop).
* ``mode="neural"`` (default): the ridge map as a linear skip path, plus a residual branch — a small
  bidirectional transformer over the sequence (``layers`` blocks of width ``hidden``, learned positions;
  ``layers=0`` gives a per-position MLP). The branch's output layer starts at zero, so training starts
  exactly at the linear inverter and refines it; the transformer can read a token back from the positions
  after it (a causal head mixes token t into every later position). Trained with Adam on a **sampled
  softmax** over cosine logits ``scale * cos(u, E_v)`` tied to the frozen embedding table: each step's
  candidate set is every token of the shadow/training vocabulary plus ``negatives`` tokens drawn uniformly
  from the rest of the vocabulary, never the full 49,152-way softmax — affordable on a CPU, while the
  random negatives still push unseen tokens down. No per-token bias, so a token's score depends on its
  embedding only and unseen tokens are not handicapped at decoding time.

Noise (``noise_sigma``): Gaussian noise of that standard deviation, in the head's raw output units, is added
to the training features (BiSR's noise-robust inverter against DP-noised activations). The neural mode draws
fresh noise each step; the linear mode uses its exact expectation (ridge on infinitely many noisy copies adds
``sigma^2 / sd^2`` to the diagonal of the Gram matrix).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.toolkit.decoding import LMPrior, choose_prior_weight, cosine_topk, nearest_rows
from attacks.toolkit.linear import (
    LinearInverter,
    TrainingPairs,
    design,
    fit_ridge_map,
    standardiser,
    training_pairs,
)
from attacks.toolkit.observe import decode_rows, stacked
from attacks.toolkit.simulate import defended, simulate_shadow, split_rows
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations
from suite.scoring.metrics import token_accuracy

MODES = ("linear", "neural")


PRIOR_SELECTION_ROWS = 32


@dataclass(frozen=True)
class LearnedInversionConfig(AttackConfig):
    mode: str = "neural"  # "linear" (closed-form ridge) | "neural" (ridge skip + small transformer)
    ridge_lambda: float = 1e-2  # ridge strength, relative to the mean diagonal of the Gram matrix
    position_feature: bool = True  # linear mode: append a one-hot position to the features
    hidden: int | None = None  # neural: width of the transformer (None = the head's width)
    layers: int = 1  # neural: transformer blocks over the sequence (0 = per-position MLP)
    heads: int = 4  # neural: attention heads (must divide ``hidden``)
    dropout: float = 0.1  # neural: dropout inside the transformer
    steps: int = 300  # neural: Adam steps
    batch_size: int = 32  # neural: sequences per step
    lr: float = 1e-3  # neural: Adam learning rate (cosine-decayed to 0)
    weight_decay: float = 0.0  # neural: AdamW weight decay
    negatives: int = 2048  # neural: random out-of-training-vocabulary tokens in each step's sampled softmax
    noise_sigma: float = 0.0  # std of Gaussian noise added to training activations (raw units); 0 = none
    use_colluder: bool = True  # use the colluder's head / records as extra training pairs when granted
    # Defence-aware (attacks/toolkit/simulate.py): against a defended cell, simulate the defense on shadow text,
    # choose clean-fit / noise-fit / mixed features and the ridge strength (and linear vs neural) on a
    # held-out part of that simulation, and decode with the public LM's prior (beam search).
    adaptive: bool = True
    prior_candidates: int = 32  # adaptive: inverter candidates per position for the LM-prior beam
    beam: int = 4  # adaptive: beam width of the LM-prior decoder

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.ridge_lambda < 0 or self.noise_sigma < 0 or self.weight_decay < 0:
            raise ValueError("ridge_lambda, noise_sigma and weight_decay must be >= 0")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError("hidden must be >= 1 (or None for the head's width)")
        if self.hidden is not None and self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        if self.heads < 1 or self.layers < 0 or self.steps < 0 or self.batch_size < 1 or self.negatives < 0:
            raise ValueError("heads and batch_size must be >= 1; layers, steps and negatives >= 0")
        if not self.lr > 0 or not 0 <= self.dropout < 1:
            raise ValueError("lr must be > 0 and dropout in [0, 1)")


class _Inverter(nn.Module):
    """Standardised head outputs [B, T, H] -> vectors [B, T, E] in the input-embedding space."""

    def __init__(self, skip: torch.Tensor, max_len: int, hidden: int, layers: int, heads: int, dropout: float):
        super().__init__()
        dim, emb = skip.shape[0] - 1, skip.shape[1]
        # The linear path, initialised at the ridge solution (weights + bias row).
        self.skip = nn.Linear(dim, emb)
        with torch.no_grad():
            self.skip.weight.copy_(skip[:-1].T)
            self.skip.bias.copy_(skip[-1])
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))
        self.pos = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.pos.weight, std=0.02)
        if layers:
            block = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.body: nn.Module = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        else:
            self.body = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                      nn.Dropout(dropout), nn.Linear(2 * hidden, hidden))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, emb))
        nn.init.zeros_(self.out[1].weight)  # the residual branch starts silent: training starts at the ridge map
        nn.init.zeros_(self.out[1].bias)
        self.log_scale = nn.Parameter(torch.tensor(2.5))  # cosine-logit temperature, e^2.5 ~ 12

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.pos(torch.arange(x.shape[1]))
        if isinstance(self.body, nn.TransformerEncoder):
            h = self.body(h, src_key_padding_mask=~mask.bool())
        else:
            h = h + self.body(h)
        return self.skip(x) + self.out(h)


@register_attack("learned_inversion")
class LearnedInversionAttack(Attack):
    requires = frozenset({Capability.ACTIVATIONS, Capability.BASE_WEIGHTS, Capability.SHADOW_DATA})
    uses = frozenset({Capability.COLLUDER_WEIGHTS, Capability.COLLUDER_DATA})
    Config = LearnedInversionConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        cfg: LearnedInversionConfig = self.config
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        pairs, head = training_pairs(obs, cfg.use_colluder)
        table = head.embed.weight.detach().float()  # [V, E]: the decoding table (public input embedding)
        real = pairs.mask.bool()
        hidden, vmask = stacked(obs)
        length = hidden.shape[1]
        if length > pairs.feats.shape[1]:
            raise ValueError(f"victim sequences ({length}) are longer than max_length ({pairs.feats.shape[1]})")
        extra: dict = {"mode": cfg.mode, "training_sequences": int(pairs.feats.shape[0]),
                       "training_tokens": int(real.sum()), "sources": pairs.sources, "adaptive": bool(cfg.adaptive),
                       "simulated_defense": False}
        if cfg.adaptive and defended(obs):
            ids = self._adaptive(obs, pairs, head, table, hidden, vmask, gen, extra)
            extra["seconds"] = time.perf_counter() - start
            return Reconstruction(ids, decode_rows(obs.tokenizer, ids, vmask), extra=extra)

        if cfg.mode == "linear":
            inverter = LinearInverter(pairs.feats, pairs.ids, pairs.mask, table, lam=cfg.ridge_lambda,
                                      position=cfg.position_feature, noise_sigma=cfg.noise_sigma)
            pred = inverter.predict(hidden)
        else:
            # Standardise with the training pairs' statistics; noise std in standardised units is sigma / sd.
            mu, sd = standardiser(pairs.feats[real])
            x, vx = (pairs.feats - mu) / sd, (hidden - mu) / sd
            noise = cfg.noise_sigma / sd  # [H]
            targets = F.normalize(table, dim=-1)[pairs.ids]  # [N, T, E], cosine decoding: fit unit vectors
            model = self._fit_neural(x, pairs.ids, real, targets, noise, table, gen, extra)
            with torch.no_grad():
                model.eval()
                pred = torch.cat([model(vx[lo : lo + 64], vmask[lo : lo + 64])
                                  for lo in range(0, vx.shape[0], 64)])
        ids = nearest_rows(pred, table).masked_fill(~vmask.bool(), obs.tokenizer.pad_token_id or 0)
        extra["seconds"] = time.perf_counter() - start
        return Reconstruction(ids, decode_rows(obs.tokenizer, ids, vmask), extra=extra)

    def _adaptive(self, obs, pairs: TrainingPairs, head, table, hidden, vmask, gen, extra) -> torch.Tensor:
        """Model selection under the simulated defense, then the LM-prior beam (see the config's ``adaptive``)."""
        cfg: LearnedInversionConfig = self.config
        released = simulate_shadow(obs, head, pairs.ids, pairs.mask, cfg.seed)
        fit, held = split_rows(pairs.ids.shape[0], cfg.seed)
        real = pairs.mask.bool()
        targets = F.normalize(table, dim=-1)[pairs.ids]
        length = pairs.ids.shape[1]

        def stats(f: torch.Tensor, m: torch.Tensor):
            return standardiser(f[m])

        def share(pred: torch.Tensor, want: torch.Tensor) -> float:  # flattened real positions
            return token_accuracy(want[None], pred[None], torch.ones_like(want)[None])

        # Candidate feature sets to fit on; "clean" with the configured noise and ridge is the non-adaptive attack.
        feature_sets = {"clean": (pairs.feats, pairs.ids, real, targets),
                        "noise": (released, pairs.ids, real, targets)}
        lambdas = sorted({cfg.ridge_lambda, 1e-3, 1e-2, 1e-1, 1.0})
        lambdas.remove(cfg.ridge_lambda)
        lambdas = [cfg.ridge_lambda, *lambdas]
        held_x_raw, held_ids, held_mask = released[held], pairs.ids[held], pairs.mask[held]
        held_real = held_mask.bool()
        truth = held_ids[held_real]
        # Selection is two-stage, for time: every candidate is scored against the attacker's own shadow
        # vocabulary (a proxy that ranks candidates like the full one), then the best three against the whole
        # vocabulary, which decides. Only real (non-padding) held-out positions are decoded.
        vocab = torch.unique(pairs.ids[real])
        sub_table = table[vocab]
        table_sel: dict[str, float] = {}
        scored = []
        for fs_name in ("clean", "noise", "mixed"):
            if fs_name == "mixed":
                f = torch.cat([pairs.feats[fit], released[fit]])
                i, r, tg = torch.cat([pairs.ids[fit]] * 2), torch.cat([real[fit]] * 2), torch.cat([targets[fit]] * 2)
            else:
                f_all, _, _, _ = feature_sets[fs_name]
                f, i, r, tg = f_all[fit], pairs.ids[fit], real[fit], targets[fit]
            mu, sd = stats(f, r)
            x = (f - mu) / sd
            noise = (cfg.noise_sigma / sd) if fs_name == "clean" else torch.zeros_like(sd)
            hx = design((held_x_raw - mu) / sd, length, position=cfg.position_feature)[held_real]
            for lam in lambdas:
                w = self._fit_linear(x, r, tg, noise, cfg.position_feature, lam)
                coarse = share(vocab[nearest_rows(hx @ w, sub_table)], truth)
                scored.append((coarse, len(scored), fs_name, lam, mu, sd, w, hx))
        best = None
        # The non-adaptive candidate (clean features, the configured ridge) always reaches the final: adapting
        # must never end weaker than not adapting because of the proxy.
        finalists = sorted(scored, key=lambda c: (-c[0], c[1]))[:3]
        finalists = sorted(finalists + ([scored[0]] if all(c[1] != 0 for c in finalists) else []), key=lambda c: c[1])
        for _coarse, _, fs_name, lam, mu, sd, w, hx in finalists:
            acc = share(nearest_rows(hx @ w, table), truth)
            table_sel[f"{fs_name}/ridge={lam:g}"] = acc
            if best is None or acc > best[0] + 1e-9:
                best = (acc, fs_name, lam, mu, sd, w)
        for coarse, _, fs_name, lam, *_ in scored:
            table_sel.setdefault(f"{fs_name}/ridge={lam:g} (shadow vocabulary)", coarse)
        acc, fs_name, lam, mu, sd, w = best
        choice = {"features": fs_name, "ridge_lambda": lam, "method": "linear", "held_accuracy": acc}

        def predict_linear(raw: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return design((raw - mu) / sd, length, position=cfg.position_feature) @ w

        predict = predict_linear
        if cfg.mode == "neural":
            if fs_name == "mixed":
                f = torch.cat([pairs.feats[fit], released[fit]])
                i, r, tg = torch.cat([pairs.ids[fit]] * 2), torch.cat([real[fit]] * 2), torch.cat([targets[fit]] * 2)
            else:
                f = feature_sets[fs_name][0][fit]
                i, r, tg = pairs.ids[fit], real[fit], targets[fit]
            x = (f - mu) / sd
            noise = (cfg.noise_sigma / sd) if fs_name == "clean" else torch.zeros_like(sd)
            model = self._fit_neural(x, i, r, tg, noise, table, gen, extra)
            model.eval()

            def predict_neural(raw: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    v = (raw - mu) / sd
                    return torch.cat([model(v[lo : lo + 64], m[lo : lo + 64]) for lo in range(0, v.shape[0], 64)])

            acc_n = token_accuracy(held_ids, nearest_rows(predict_neural(held_x_raw, held_mask), table), held_mask)
            table_sel["neural"] = acc_n
            if acc_n > acc + 1e-9:
                choice.update(method="neural", held_accuracy=acc_n)
                predict = predict_neural
        # The LM-prior decoder: its weight chosen on the simulated held-out rows (teacher-forced).
        prior = LMPrior(obs.base_model())
        # The prior's weight is chosen on (at most) 32 held-out rows: a full LM forward per row is its cost.
        few = slice(0, PRIOR_SELECTION_ROWS)
        held_scores, held_cand = cosine_topk(predict(held_x_raw[few], held_mask[few]), table, cfg.prior_candidates)
        weight, weights = choose_prior_weight(prior, held_scores, held_cand, held_ids[few], held_mask[few])
        if choice["method"] == "linear":  # refit the chosen candidate on every simulated row now that it is chosen
            if fs_name == "mixed":
                f, i, r, tg = (torch.cat([pairs.feats, released]), torch.cat([pairs.ids] * 2),
                               torch.cat([real] * 2), torch.cat([targets] * 2))
            else:
                f, i, r, tg = feature_sets[fs_name]
            mu, sd = stats(f, r)
            noise = (cfg.noise_sigma / sd) if fs_name == "clean" else torch.zeros_like(sd)
            w = self._fit_linear((f - mu) / sd, r, tg, noise, cfg.position_feature, lam)
        scores, cand = cosine_topk(predict(hidden, vmask), table, cfg.prior_candidates)
        if weight > 0:
            ids = prior.beam(scores, cand, vmask, weight, cfg.beam)
        else:
            ids = cand[..., 0]
        ids = ids.masked_fill(~vmask.bool(), obs.tokenizer.pad_token_id or 0)
        extra.update(simulated_defense=True, selection=table_sel, choice=choice, prior_weight=weight,
                     prior_selection=weights)
        return ids

    def _fit_linear(self, x, real, targets, noise, position: bool, lam: float | None = None) -> torch.Tensor:
        return fit_ridge_map(x, real, targets, noise, position, self.config.ridge_lambda if lam is None else lam)

    def _fit_neural(self, x, ids, real, targets, noise, table, gen, extra) -> _Inverter:
        cfg: LearnedInversionConfig = self.config
        n, length, dim = x.shape
        skip = self._fit_linear(x, real, targets, noise, position=False)  # start from the linear inverter
        hidden = cfg.hidden or dim
        if hidden % cfg.heads:
            raise ValueError(f"heads ({cfg.heads}) must divide the inverter width ({hidden}); set heads or hidden")
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)  # parameter init and dropout masks: reproducible per seed
            model = _Inverter(skip, length, hidden, cfg.layers, cfg.heads, cfg.dropout)
            # Sampled softmax: the training vocabulary is always a candidate (hard, in-domain negatives);
            # the rest of the vocabulary enters through `negatives` random rows per step.
            vocab = table.shape[0]
            seen = ids[real].unique()
            inside = torch.zeros(vocab, dtype=torch.bool)
            inside[seen] = True
            outside = (~inside).nonzero().squeeze(1)
            rows_table = F.normalize(table, dim=-1)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            # Short linear warm-up (the branch starts silent), then cosine decay to 0.
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(cfg.steps, 1))))
            losses, accs = [], []
            model.train()
            for _ in range(cfg.steps):
                idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
                xb, mb = x[idx], real[idx]
                if cfg.noise_sigma > 0:
                    xb = xb + torch.randn(xb.shape, generator=gen) * noise
                k = min(cfg.negatives, outside.numel())
                neg = outside[torch.randperm(outside.numel(), generator=gen)[:k]]
                rows = torch.cat([seen, neg])
                lookup = torch.full((vocab,), -1, dtype=torch.long)
                lookup[rows] = torch.arange(rows.numel())
                u = F.normalize(model(xb, mb)[mb], dim=-1)
                logits = model.log_scale.exp() * u @ rows_table[rows].T
                target = lookup[ids[idx][mb]]
                loss = F.cross_entropy(logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                accs.append(float((logits.argmax(-1) == target).float().mean()))
        tail = max(1, min(10, len(losses)))
        extra["train_loss"] = {"first": sum(losses[:tail]) / tail, "last": sum(losses[-tail:]) / tail} if losses else {}
        extra["train_accuracy_last"] = sum(accs[-tail:]) / tail if accs else None
        return model
