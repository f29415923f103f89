"""The prefix search's score: cosine similarity of standardised vectors ``w ⊙ (x - mu)``, with ``mu`` the mean
and ``w = 1 / sqrt(rho² sd² + noise_var)`` per hidden dimension (statistics of the reference head's outputs on
shadow text; ``noise_var`` the variance the deployed defense adds, 0 for none). Standardising keeps SmolLM2's
few "massive activation" dimensions from dominating; cosine tolerates the scale changes of fine-tuning drift
and of norm clipping; ``noise_var`` down-weights dimensions the defense drowns in noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Scorer:
    """Cosine similarity of ``w ⊙ (x - mu)`` (see the module docstring). Position 0 has statistics of its own
    (``mu0``, ``w0``): with nothing before it to attend to, its output lives elsewhere (the attention-sink
    dimensions dominate it), and standardising it with the other positions' statistics would flatten the
    differences between candidate first tokens."""

    mu: torch.Tensor  # [H]
    w: torch.Tensor  # [H]
    mu0: torch.Tensor | None = None  # [H], position 0
    w0: torch.Tensor | None = None

    def normed(self, x: torch.Tensor, first: bool = False) -> torch.Tensor:
        mu, w = (self.mu0, self.w0) if first and self.mu0 is not None else (self.mu, self.w)
        return F.normalize((x.float() - mu) * w, dim=-1)

    def score(self, target: torch.Tensor, cand: torch.Tensor, first: bool = False) -> torch.Tensor:
        """``target`` [..., H], ``cand`` [..., H] (broadcast) -> [...]; ``first``: both are at position 0."""
        return (self.normed(target, first) * self.normed(cand, first)).sum(-1)

    def score_positions(self, target: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """``target``, ``cand`` [N, T, H] aligned by position -> [N, T] (position 0 with its own statistics)."""
        out = self.score(target, cand)
        return torch.cat([self.score(target[:, :1], cand[:, :1], first=True), out[:, 1:]], 1)

    @staticmethod
    def _weights(flat: torch.Tensor, noise_var: torch.Tensor | None, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sd = flat.mean(0), flat.std(0)
        sd = sd.clamp_min(float(sd.median()) * 1e-2 + 1e-6)
        var = (rho * sd) ** 2 + (noise_var if noise_var is not None else 0.0)
        return mu, var.rsqrt()

    @staticmethod
    def fit(feats: torch.Tensor, mask: torch.Tensor, noise_var: torch.Tensor | None = None,
            rho: float = 1.0) -> Scorer:
        mu, w = Scorer._weights(feats[mask.bool()].float(), noise_var, rho)
        first = feats[:, 0][mask[:, 0].bool()].float()
        if first.shape[0] < 8:  # too few sequences for position-0 statistics: share the others'
            return Scorer(mu, w)
        mu0, w0 = Scorer._weights(first, noise_var, rho)
        return Scorer(mu, w, mu0, w0)

