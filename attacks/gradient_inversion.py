"""Label inversion from the gradients the client tail returns to the server (backward leakage; cf. the
gradient-side inverters of BiSR, CCS 2024, and analytic label recovery from the last layer, iDLG).

In causal-LM fine-tuning the labels *are* the input shifted by one, so whoever sees the tail's gradient sees
the inputs. Notation for one batch: ``H`` [B, T, D] is the trunk output (= tail input), ``Z = blocks(H)`` the
tail blocks' output, ``N = norm(Z)``, ``logits = W N``, and the loss is the mean cross-entropy over the
``n = sum(mask[:, 1:])`` real targets: ``L = (1/n) sum_t CE(logits_t, y_{t+1})``. The server receives

    G = dL/dH = (1/n) sum_t J_t^T (p_t - e_{y_{t+1}}),   J_t = d logits_t / dH,  p_t = softmax(logits_t).

The attacker (the server) recomputes ``H`` from the head output it received with the public trunk, runs the
public tail, and computes the *known* part ``A = (1/n) sum_t J_t^T p_t`` with one backward pass of
``(1/n) sum_t <stopgrad(p_t), logits_t>``. Then

    R = A - G = d/dH (1/n) sum_t logits_t[y_{t+1}]

is the gradient of the true-label logits alone. (Decoding ``G`` directly fails exactly where the model is
confident and right: ``p_t - e_y`` vanishes there; ``R`` does not.)

Undoing the tail blocks. ``R = Bᵀ R_Z`` where ``B = dZ/dH`` is the blocks' Jacobian (it mixes positions
through attention) and ``R_Z[t] = (1/n) J_norm(z_t)ᵀ W_{y_{t+1}}`` holds one label per position. Blocks are
residual (``B ≈ I``), so ``R_Z`` is recovered by Richardson iteration ``x ← x + (R - Bᵀ x)`` — one
vector-Jacobian product of the tail blocks per step (``solve_steps``; 0 = the first-order guess ``x = R``).
The iteration diverges where the blocks are far from the identity (SmolLM2's massive activations); the
iterate with the smallest residual is kept, which there is the first-order guess.

Decoding a position. The final norm is ``s ⊙ P z / σ (+ b)``: a per-dimension scale ``s``, ``σ`` the RMS (or
standard deviation), and ``P`` removing the direction of ``z`` (and, for LayerNorm, the mean). So
``n σ_t R_Z[t] = P_t (s ⊙ W_y)`` exactly, and the label is the nearest candidate,
``argmin_y ||u_t - P_t a_y||²`` with ``u_t = n σ_t R_Z[t]`` and ``a_y = s ⊙ W_y`` — two [D × V] products per
position batch, nothing learned, no shadow data.

Alignment: the gradient at position ``t`` gives the token at ``t + 1``; padding targets carry no loss and are
skipped. Position 0 never appears as a label: its token is taken from the activations instead — the head
output at position 0 depends on token 0 only (causal attention), so the public head is run on each of a few
candidates (the first tokens of shadow text if granted, plus the nearest input-embedding rows) and the best
match (cosine) is kept.

Approximations, which is where the attack loses accuracy: the recomputed ``H`` and the public tail miss the
victims' and the server's LoRA updates (the colluder's fine-tuned tail is used when granted, which is
closer); ``p`` therefore differs slightly from the victim's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.toolkit.gradients import FirstToken, NormShape, decode_labels, invert_gradients, label_gradient
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

__all__ = ["FirstToken", "GradientInversionAttack", "NormShape", "decode_labels", "label_gradient"]


@dataclass(frozen=True)
class GradientInversionConfig(AttackConfig):
    solve_steps: int = 8  # Richardson steps undoing the tail blocks' Jacobian (0 = first-order)
    first_token_candidates: int = 64  # nearest-embedding candidates for the token at position 0
    use_colluder: bool = True  # use the colluder's fine-tuned tail/head when COLLUDER_WEIGHTS is granted

    def __post_init__(self) -> None:
        if self.solve_steps < 0 or self.first_token_candidates < 0:
            raise ValueError("solve_steps and first_token_candidates must be >= 0")


@register_attack("gradient_inversion")
class GradientInversionAttack(Attack):
    requires = frozenset({Capability.ACTIVATIONS, Capability.GRADIENTS, Capability.BASE_WEIGHTS})
    uses = frozenset({Capability.COLLUDER_WEIGHTS, Capability.SHADOW_DATA})  # shadow: first-token candidates
    Config = GradientInversionConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        if not obs.batches or any(b.gradient is None for b in obs.batches):
            raise ValueError("gradient_inversion needs the tail's gradients for every observed batch")
        ids, _, texts = invert_gradients(obs, obs.batches, cfg.solve_steps, cfg.first_token_candidates,
                                         cfg.use_colluder)
        return Reconstruction(ids, texts)
