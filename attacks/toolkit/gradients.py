"""Gradient-side machinery shared by the attacks that read the client tail's returned gradient (the curious
server's ``gradient_inversion`` and the eavesdropper's ``wire_inversion`` on a plaintext wire): recover the
labels (the text shifted by one) from ``dL/dH`` with the public trunk and tail, and the first token from the
head output. The derivation is in ``attacks/gradient_inversion.py``'s docstring. The parts are
``observe.reference_parts``: the public head, trunk and tail, or the colluder's head and tail where granted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.toolkit.observe import decode_rows, reference_parts, token_embeddings, without_positions
from suite.engine.split import ClientHead, ClientTail, ServerTrunk, position_ids_for
from suite.interfaces.threats import Observations, ObservedBatch


@dataclass(frozen=True)
class NormShape:
    """What the decoder needs of the tail's final norm ``s ⊙ P z / σ (+ b)``."""

    scale: torch.Tensor  # [D] the per-dimension scale s
    centered: bool  # LayerNorm (subtracts the mean) rather than RMSNorm
    eps: float

    @staticmethod
    def of(norm: nn.Module, dim: int) -> NormShape:
        centered = isinstance(norm, nn.LayerNorm)
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        # A ±1 probe has mean 0 and RMS 1, so norm(probe) - norm(-probe) = 2 s ⊙ probe for either kind
        # (and whatever parametrisation of s the family uses, e.g. Gemma's 1 + w).
        probe = torch.ones(dim)
        probe[1::2] = -1
        with torch.no_grad():
            scale = (norm(probe[None]) - norm(-probe[None]))[0].float() / (2 * probe)
        return NormShape(scale, centered, eps)

    def sigma(self, z: torch.Tensor) -> torch.Tensor:
        if self.centered:
            return (z.var(-1, unbiased=False) + self.eps).sqrt()
        return (z.pow(2).mean(-1) + self.eps).sqrt()


def decode_labels(u: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, shape: NormShape,
                  chunk: int = 512) -> torch.Tensor:
    """For each position (rows of ``u`` and ``z``, [P, D]): the label ``y`` minimising ``||u - P_z a_y||²`` with
    ``a_y = s ⊙ W_y`` (``rows`` = W, [V, D]) and ``P_z`` the projection the norm's Jacobian applies at ``z``."""
    a = rows.float() * shape.scale  # [V, D]
    a_sq = a.pow(2).sum(-1)  # [V]
    a_mean = a.mean(-1) * a.shape[-1] ** 0.5  # component along the unit vector 1/√D (LayerNorm only)
    zc = z - z.mean(-1, keepdim=True) if shape.centered else z
    zhat = F.normalize(zc.float(), dim=-1)
    out = torch.empty(u.shape[0], dtype=torch.long)
    for lo in range(0, u.shape[0], chunk):
        uu, zz = u[lo : lo + chunk].float(), zhat[lo : lo + chunk]
        if shape.centered:
            uu = uu - uu.mean(-1, keepdim=True)
        proj = zz @ a.T  # [P, V]
        norm_sq = a_sq - proj.pow(2) - (a_mean.pow(2) if shape.centered else 0)  # ||P a_y||²
        # u lies in the range of P, so <u, P a_y> = <u, a_y>.
        out[lo : lo + chunk] = (2 * (uu @ a.T) - norm_sq).argmax(-1)
    return out


def label_gradient(tail: ClientTail, trunk_out: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor,
                   solve_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R_Z, Z, n)``: the gradient of the mean true-label logit w.r.t. the tail blocks' output ``Z`` (from the
    observed gradient ``grad`` w.r.t. the tail input), ``Z`` itself, and the number of targets ``n``."""
    positions = position_ids_for(mask)
    h = trunk_out.detach().float().requires_grad_(True)
    z = tail.blocks(h, mask, positions)
    z_leaf = z.detach().requires_grad_(True)
    logits = tail.lm_head(tail.norm(z_leaf)).float()[:, :-1]
    targets = mask[:, 1:].float()
    n = targets.sum().clamp_min(1.0)
    p = torch.softmax(logits, dim=-1).detach()
    known_z = torch.autograd.grad(((p * logits).sum(-1) * targets).sum() / n, z_leaf)[0]  # A in Z-space

    def vjp(x: torch.Tensor) -> torch.Tensor:  # Bᵀ x
        return torch.autograd.grad(z, h, x, retain_graph=True)[0]

    # Observed G = Bᵀ (A_Z - R_Z)  =>  solve Bᵀ g_z = G, then R_Z = A_Z - g_z.
    # Richardson converges only while the blocks stay close to the identity (spectral radius of I - Bᵀ below
    # 1). Pretrained LMs with massive activations (SmolLM2) break that and the iteration diverges, so the
    # iterate with the smallest residual ||G - Bᵀ x|| is kept and the solve stops as soon as it grows.
    g = grad.float()
    g_z = best = g.clone()
    if len(tail.blocks.layers) and solve_steps:
        residual = g - vjp(g_z)
        best_norm = residual.norm()
        for _ in range(solve_steps):
            g_z = g_z + residual
            residual = g - vjp(g_z)
            norm = residual.norm()
            if not torch.isfinite(norm) or norm >= best_norm:
                break
            best, best_norm = g_z, norm
    return known_z - best, z.detach(), n


class FirstToken:
    """The token at position 0 from the head output there, which depends on that token alone (causal
    attention): run the head on each candidate as a one-token sequence and keep the best cosine match."""

    def __init__(self, head: ClientHead, obs: Observations, nearest: int):
        self.head, self.nearest = head, nearest
        self.table = token_embeddings(head)
        shadow_first: list[int] = []
        for text in obs.shadow or ():
            tokens = obs.tokenizer(text, truncation=True, max_length=2)["input_ids"]
            if tokens:
                shadow_first.append(int(tokens[0]))
        self.shadow = torch.tensor(sorted(set(shadow_first)), dtype=torch.long)

    def guess(self, first_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, D] head outputs at position 0 -> [B] token ids."""
        one = torch.ones(first_hidden.shape[0], 1, dtype=mask.dtype)
        base = without_positions(self.head, first_hidden[:, None], one)[:, 0]
        sims = F.normalize(base, dim=-1) @ F.normalize(self.table, dim=-1).T  # [B, V]
        near = sims.topk(min(self.nearest, sims.shape[-1]), dim=-1).indices.flatten() if self.nearest else None
        pool = torch.cat([t for t in (self.shadow, near) if t is not None and t.numel()]).unique()
        if pool.numel() == 0:
            return sims.argmax(-1)
        cmask = torch.ones(pool.shape[0], 1, dtype=mask.dtype)
        with torch.no_grad():
            out = self.head(pool[:, None], cmask, position_ids_for(cmask))[:, 0].float()  # [C, D]
        score = F.normalize(first_hidden, dim=-1) @ F.normalize(out, dim=-1).T  # [B, C]
        return pool[score.argmax(-1)]


def invert_gradients(obs: Observations, batches: tuple[ObservedBatch, ...], solve_steps: int,
                     first_token_candidates: int, use_colluder: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Token ids [N, T] (rows in the order of ``batches``), the mask and the decoded texts, from the tail's
    gradients (labels at positions 1..) and the head output at position 0."""
    if not batches or any(b.gradient is None for b in batches):
        raise ValueError("gradient inversion needs the tail's gradients for every observed batch")
    parts = reference_parts(obs, use_colluder)
    head, trunk, tail = parts.head, parts.trunk, parts.tail
    rows = tail.lm_head.weight.detach().float()  # [V, D]
    shape = NormShape.of(tail.norm, rows.shape[1])
    first = FirstToken(head, obs, first_token_candidates)
    length = max(b.hidden.shape[1] for b in batches)
    all_ids, all_masks = [], []
    for b in batches:
        mask = b.attention_mask
        with torch.no_grad():
            trunk_out = trunk(b.hidden.float(), mask, position_ids_for(mask))
        r_z, z, n = label_gradient(tail, trunk_out, mask, b.gradient, solve_steps)
        u = r_z * n * shape.sigma(z).unsqueeze(-1)
        labels = decode_labels(u[:, :-1].reshape(-1, u.shape[-1]), z[:, :-1].reshape(-1, z.shape[-1]), rows, shape)
        ids = torch.zeros_like(mask, dtype=torch.long)
        ids[:, 1:] = labels.reshape(mask.shape[0], -1)  # gradient at t -> token at t + 1
        ids[:, 0] = first.guess(b.hidden.float()[:, 0], mask)
        all_ids.append(F.pad(ids, (0, length - ids.shape[1])))
        all_masks.append(F.pad(mask, (0, length - mask.shape[1])))
    ids, mask = torch.cat(all_ids), torch.cat(all_masks)
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, decode_rows(obs.tokenizer, ids, mask)


def gradient_residuals(obs: Observations, batches: tuple[ObservedBatch, ...], candidates: list[torch.Tensor],
                       use_colluder: bool) -> torch.Tensor:
    """A confidence the attacker computes without ground truth: for each candidate reconstruction (token ids
    [N, T], rows in the order of ``batches``), the per-row relative distance between the gradient the tail
    would have returned had the row's labels been that text (public trunk and tail, the observed head
    output) and the gradient actually observed, per position: [len(candidates), N, T] (position t holds the
    distance at the gradient of position t, which the label at t + 1 drives). Smaller is more consistent."""
    parts = reference_parts(obs, use_colluder)
    trunk, tail = parts.trunk, parts.tail
    length = max(b.hidden.shape[1] for b in batches)
    out = torch.full((len(candidates), sum(b.hidden.shape[0] for b in batches), length), float("inf"))
    lo = 0
    for b in batches:
        mask = b.attention_mask
        n_rows, t_len = mask.shape
        with torch.no_grad():
            trunk_out = trunk(b.hidden.float(), mask, position_ids_for(mask))
        targets = mask[:, 1:].float()
        n = targets.sum().clamp_min(1.0)
        g_obs = b.gradient.float()
        for c, ids in enumerate(candidates):
            labels = ids[lo : lo + n_rows, 1:t_len].long()
            h = trunk_out.detach().requires_grad_(True)
            logits = tail(h, mask, position_ids_for(mask)).float()[:, :-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            loss = (ce.view(n_rows, -1) * targets).sum() / n
            g = torch.autograd.grad(loss, h)[0]
            scale = g_obs.flatten(1).norm(dim=1).clamp_min(1e-12).unsqueeze(-1)
            out[c, lo : lo + n_rows, :t_len] = (g - g_obs).norm(dim=-1) / scale
        lo += n_rows
    return out


# -- backward evidence for fused attacks (``bisr``) ----------------------------------------------------------
# How well every vocabulary token explains the gradient the client tail returned, per position: the gradient
# at position t carries the label of position t + 1. The arithmetic is ``label_gradient``'s and ``NormShape``'s,
# returning scores over the whole vocabulary instead of the argmax.


def label_scores(u: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, shape: NormShape) -> torch.Tensor:
    """[P, V]: ``-||u - P_z a_y||² / ||u||²`` for every label ``y`` (0 = perfect fit), per position."""
    a = rows.float() * shape.scale
    a_sq = a.pow(2).sum(-1)
    a_mean = a.mean(-1) * a.shape[-1] ** 0.5
    zc = z - z.mean(-1, keepdim=True) if shape.centered else z
    zhat = F.normalize(zc.float(), dim=-1)
    uu = u.float()
    if shape.centered:
        uu = uu - uu.mean(-1, keepdim=True)
    proj = zhat @ a.T
    norm_sq = a_sq - proj.pow(2) - (a_mean.pow(2) if shape.centered else 0)
    u_sq = uu.pow(2).sum(-1, keepdim=True)
    return (2 * (uu @ a.T) - norm_sq - u_sq) / u_sq.clamp_min(1e-30)


def gradient_evidence(trunk: ServerTrunk, tail: ClientTail, hidden: torch.Tensor, mask: torch.Tensor,
                      grad: torch.Tensor, solve_steps: int = 8) -> torch.Tensor:
    """[N, T, V] label scores for the token at each position from one batch's observed head output ``hidden``
    and tail gradient ``grad``. Position 0 (never a label) gets zeros."""
    rows = tail.lm_head.weight.detach().float()
    shape = NormShape.of(tail.norm, rows.shape[1])
    with torch.no_grad():
        trunk_out = trunk(hidden.float(), mask, position_ids_for(mask))
    r_z, z, n = label_gradient(tail, trunk_out, mask, grad, solve_steps)
    u = r_z * n * shape.sigma(z).unsqueeze(-1)
    b, length, _ = u.shape
    out = torch.zeros(b, length, rows.shape[0])
    for i in range(b):
        out[i, 1:] = label_scores(u[i, :-1], z[i, :-1], rows, shape)
    return out


def simulate_gradient(trunk: ServerTrunk, tail: ClientTail, released: torch.Tensor, ids: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """The gradient a client tail would return for ``ids`` [N, T] given the trunk input ``released`` (the
    attacker's own simulation: mean next-token cross-entropy over real targets, w.r.t. the trunk output)."""
    positions = position_ids_for(mask)
    with torch.no_grad():
        trunk_out = trunk(released.float(), mask, positions)
    h = trunk_out.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = tail(h, mask, positions).float()[:, :-1]
        targets = mask[:, 1:].bool()
        loss = F.cross_entropy(logits[targets], ids[:, 1:][targets])
        (g,) = torch.autograd.grad(loss, h)
    return g
