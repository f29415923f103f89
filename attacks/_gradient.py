"""Backward evidence for fused attacks (``bisr``): how well every vocabulary token explains the gradient the
client tail returned, per position. The gradient at position ``t`` carries the label of position ``t + 1``
(causal-LM labels are the input shifted by one); the arithmetic is ``attacks.gradient_inversion``'s
(``label_gradient``: the true-label part of the gradient, undone through the tail blocks; ``NormShape``: the
final norm's projection), here returning scores over the whole vocabulary instead of the argmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attacks.gradient_inversion import NormShape, label_gradient
from suite.split import ClientTail, ServerTrunk, position_ids_for


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
