"""DxP: metric differential privacy (d_χ-privacy, Feyisetan et al. 2020) on the input embeddings, as
SplitLLM uses it: every token embedding x is replaced by x + z before the client head's first block, with
density p(z) ∝ exp(−η‖z‖). Sampling: a direction uniform on the unit sphere times a magnitude drawn from
Gamma(shape = H, scale = 1/η), H the hidden size. Two inputs at embedding distance d are then
e^{η·d}-indistinguishable per token; larger η means less noise. The perturbation happens on the client,
so the server only ever sees activations of the perturbed embeddings.

Noise source: each client's own ChaCha20 keystream keyed from ``os.urandom`` when the defense is installed
(``suite.engine.noise``), never from the config the server also holds. ``seed`` (an integer) is
for reproducible tests only, UNSAFE, and refused by ``splitleak serve``/``client``. Pad positions get no
noise; what leaves there is a function of the perturbed real embeddings and the public pad token only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from suite.engine.noise import NoiseStream, as_stream, client_stream
from suite.engine.parties import Batch
from suite.interfaces.defense import Defense, DefenseConfig, register_defense


@dataclass(frozen=True)
class DxPConfig(DefenseConfig):
    eta: float = 100.0  # privacy parameter per unit of embedding distance (larger = less noise)
    seed: int | None = None  # UNSAFE, tests only: fixes the noise (None = fresh OS randomness per client)

    def __post_init__(self) -> None:
        if isinstance(self.eta, bool) or not isinstance(self.eta, int | float) or not math.isfinite(self.eta) \
                or self.eta <= 0:
            raise ValueError(f"eta must be a finite number > 0 (inf would send clean embeddings), got {self.eta!r}")


def dx_noise(shape: torch.Size, eta: float, source: NoiseStream | torch.Generator) -> torch.Tensor:
    """Noise with density ∝ exp(−eta ‖z‖) over the last dimension (size H): a uniform direction times a
    Gamma(H, 1/eta) magnitude, drawn as a sum of H exponentials, all from ``source``'s stream (float32)."""
    stream = as_stream(source)
    direction = stream.normal(shape)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    magnitude = stream.exponential(shape).sum(-1, keepdim=True) / eta
    return (direction * magnitude).float()


@register_defense("dxp")
class DxPDefense(Defense):
    Config = DxPConfig
    secret_fields = frozenset({"seed"})  # the noise seed; eta is public

    def __init__(self, config: DxPConfig | None = None):
        super().__init__(config)
        self.norms: list[float] = []

    def install(self, session) -> None:
        for client in session.clients:
            stream = client_stream(self.config.seed, client.id)

            def perturb(embeds: torch.Tensor, batch: Batch, stream=stream) -> torch.Tensor:
                noise = dx_noise(embeds.shape, self.config.eta, stream).to(embeds.device, embeds.dtype)
                noise = noise * batch.attention_mask.unsqueeze(-1).to(embeds.dtype)
                self.norms.append(float(noise.norm(dim=-1).sum() / batch.attention_mask.sum().clamp_min(1)))
                return embeds + noise

            client.input_hooks.append(perturb)

    def simulate_release(self, head, input_ids, attention_mask, generator):
        """The attacker's shadow input embeddings perturbed with the same ``dx_noise`` and public eta (noise
        from the attacker's ``generator``), then run through ``head``: what the server would see."""
        from suite.engine.split import position_ids_for

        positions = position_ids_for(attention_mask)
        with torch.no_grad():
            embeds = head.embed_tokens(input_ids, positions)
            noise = dx_noise(embeds.shape, self.config.eta, generator).to(embeds.dtype)
            embeds = embeds + noise * attention_mask.unsqueeze(-1).to(embeds.dtype)
            return head(input_ids, attention_mask, positions, inputs_embeds=embeds)

    def server_bounds(self, bounds, hidden_size: int):
        """The noise moves each input embedding by a Gamma(H, 1/eta) length (mean H/eta, sd √H/eta): the
        activation bound grows by H/eta + 12·√H/eta, what an honest client's noise stays under. Exact in
        reach for an embedding-only head (k = 0); past k blocks a heuristic (the residual stream carries the
        perturbation through, scaled by the blocks)."""
        import dataclasses

        if bounds.activation_norm is None:
            return bounds
        reach = (hidden_size + 12 * hidden_size ** 0.5) / self.config.eta
        return dataclasses.replace(bounds, activation_norm=bounds.activation_norm + reach)

    def report(self) -> dict:
        return {"eta": self.config.eta,
                "mean_noise_norm": sum(self.norms) / len(self.norms) if self.norms else 0.0}
