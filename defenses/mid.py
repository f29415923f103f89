"""MID (VFLAIR-LLM's mutual-information defence): a variational information bottleneck on the client head's
output, trained with the task.

The head output h [B, T, H] goes through a client-owned encoder to the mean and log-variance of a
``dim``-dimensional z per token; z = mu + sigma * eps is sampled (reparameterised) with client-side
randomness the server cannot regenerate (each client's own ChaCha20 keystream keyed from ``os.urandom``, see
``suite.engine.noise``), and a client-owned decoder
lifts z back to H, which is what is sent. The client's loss gains ``lam`` times the KL divergence
KL(N(mu, sigma^2) || N(0, I)) per token, which upper-bounds the mutual information I(h; z) that the variational
bound allows to pass per token (Alemi et al. 2017); ``lam`` is the sweep axis.

The encoder's mean starts as the whitened principal-subspace projection of the client's own head outputs
(so the bottleneck starts from the best rank-``dim`` reconstruction rather than a random map), the log-variance
at ``init_logvar`` everywhere; both then train with the task and the KL term.

Accounting: the report gives the mean KL per token over training (nats; the variational upper bound on the
information per token that leaves the client), first and last, and the mean sigma.

Attacker simulation: the client's encoder and decoder are private, so the attacker trains its own MID with
the same ``lam``, ``dim`` and ``init_logvar`` on shadow text through its public head (objective: keep the
head output, plus ``lam`` x KL), and samples with its own generator, see ``defenses._learned``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from defenses._learned import (
    anchor_loss,
    attach,
    head_outputs,
    principal_subspace,
    simulate,
)
from suite.engine.noise import NoiseStream, as_stream, client_stream
from suite.engine.parties import Batch
from suite.interfaces.defense import Defense, DefenseConfig, register_defense

NAME = "defense_mid"


@dataclass(frozen=True)
class MIDConfig(DefenseConfig):
    lam: float = 0.01  # weight of the KL term in the client's loss (the sweep axis)
    dim: int = 64  # dimension of z per token
    init_logvar: float = -2.0  # initial log-variance of z (whitened units: 0 = noise as large as the signal)
    lr: float = 1e-2  # learning rate of the encoder and decoder (client optimiser)
    sim_steps: int = 50  # the attacker's training steps for its own MID
    seed: int | None = None  # tests only; otherwise the OS CSPRNG seeds the sampling. Secret.

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not self.lr > 0 or self.sim_steps < 0:
            raise ValueError("lr must be > 0 and sim_steps >= 0")


class VariationalBottleneck(nn.Module):
    def __init__(self, hidden: int, dim: int, init_logvar: float):
        super().__init__()
        self.mu = nn.Linear(hidden, dim)
        self.logvar = nn.Linear(hidden, dim)
        self.up = nn.Linear(dim, hidden)
        with torch.no_grad():
            self.logvar.weight.zero_()
            self.logvar.bias.fill_(init_logvar)

    @torch.no_grad()
    def fit(self, sample: torch.Tensor, source: NoiseStream | torch.Generator) -> VariationalBottleneck:
        mean, basis, std = principal_subspace(sample, self.mu.out_features, source)
        self.mu.weight.copy_((basis / std).T)
        self.mu.bias.copy_(-(mean @ basis) / std)
        self.up.weight.copy_(basis * std)
        self.up.bias.copy_(mean)
        return self

    def forward(self, h: torch.Tensor, stream: NoiseStream) -> tuple[torch.Tensor, torch.Tensor]:
        """What is sent [B, T, H] and the KL per token [B, T]."""
        x = h.float()
        mu, logvar = self.mu(x), self.logvar(x).clamp(-20.0, 10.0)
        eps = stream.normal(mu.shape).to(mu.device, mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1)
        return self.up(z).to(h.dtype), kl


def _token_mean(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


@register_defense("mid")
class MIDDefense(Defense):
    Config = MIDConfig

    def __init__(self, config: MIDConfig | None = None):
        super().__init__(config)
        self.kl_history: list[float] = []
        self.sigmas: list[float] = []
        self._kl: dict[int, torch.Tensor] = {}  # the current step's KL per client (for its loss hook)

    def install(self, session) -> None:
        for client in session.clients:
            gen = client_stream(self.config.seed, client.id)  # each client its own stream
            data = client.batches.data
            sample = head_outputs(client.head, data["input_ids"], data["attention_mask"])
            module = VariationalBottleneck(sample.shape[-1], self.config.dim, self.config.init_logvar)
            module.fit(sample, gen)
            attach(client, NAME, module, self.config.lr)

            def bottleneck(out: torch.Tensor, batch: Batch, module=module, cid=client.id, gen=gen) -> torch.Tensor:
                sent, kl = module(out, gen)
                self._kl[cid] = _token_mean(kl, batch.attention_mask)
                return sent

            def kl_loss(head_out: torch.Tensor, embeds, batch: Batch, cid=client.id, module=module) -> torch.Tensor:
                kl = self._kl.pop(cid)
                self.kl_history.append(float(kl.detach()))
                self.sigmas.append(float(torch.exp(0.5 * module.logvar.bias.detach()).mean()))
                return self.config.lam * kl

            client.activation_hooks.append(bottleneck)
            client.head_loss_hooks.append(kl_loss)

    def report(self) -> dict:
        tail = self.kl_history[-10:]
        return {"lam": self.config.lam, "dim": self.config.dim,
                "kl_per_token_first": self.kl_history[0] if self.kl_history else None,
                "kl_per_token_last10": sum(tail) / len(tail) if tail else None,
                "sigma_bias_last": self.sigmas[-1] if self.sigmas else None}

    # -- the attacker's simulation ------------------------------------------------------------------------

    def _module(self, sample: torch.Tensor, generator: torch.Generator) -> VariationalBottleneck:
        module = VariationalBottleneck(sample.shape[-1], self.config.dim, self.config.init_logvar)
        return module.fit(sample, generator)

    def simulate_head(self, head, input_ids, attention_mask, generator):
        module = self._module(head_outputs(head, input_ids, attention_mask), generator)
        stream = as_stream(generator)

        def objective(m, out, mask, gen):
            sent, kl = m(out, stream)
            return anchor_loss(sent, out, mask) + self.config.lam * _token_mean(kl, mask)

        return simulate(head, NAME, module, objective, input_ids, attention_mask, generator,
                        self.config.sim_steps, self.config.lr)

    def simulate_release(self, head, input_ids, attention_mask, generator):
        from suite.engine.split import position_ids_for

        with torch.no_grad():
            out = head(input_ids, attention_mask, position_ids_for(attention_mask))
            module = getattr(head, NAME, None)
            if module is None:  # a head without the attacker's own MID: fit one (untrained) on this batch
                module = self._module(out.float()[attention_mask.bool()], generator)
            return module(out, as_stream(generator))[0]
