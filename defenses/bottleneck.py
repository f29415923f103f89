"""A low-rank bottleneck on what leaves the client: the head output h [B, T, H] is projected to rank r and
lifted back on the client, so the trunk sees the same shape but every vector sent lies in one r-dimensional
(affine) subspace: sent = up(down(h)), down: H -> r, up: r -> H, both client-owned and trained with the task.

The dimension-reduction baseline that learned-defence papers compare against (e.g. the bottleneck layers
of split-learning defences, VFLAIR-LLM's comparisons). Whatever the server or an eavesdropper learns about
the input comes through r numbers per token; the rank is the sweep axis. No formal guarantee exists, so the
report gives the rank and how much of the head output's variance the subspace keeps (on the client's own
data, at the start and after training).

Attacker simulation: the client's projection is private, so the attacker fits its own rank-r bottleneck on
shadow text through its public head (principal subspace, then trained to keep the head output), see
``defenses._learned``.
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
from suite.engine.noise import NoiseStream, client_stream
from suite.engine.parties import Batch
from suite.interfaces.defense import Defense, DefenseConfig, register_defense

NAME = "defense_bottleneck"


@dataclass(frozen=True)
class BottleneckConfig(DefenseConfig):
    rank: int = 16  # dimensions per token that leave the client (the sweep axis)
    lr: float = 1e-3  # learning rate of the projection (client optimiser)
    sim_steps: int = 50  # the attacker's training steps for its own bottleneck
    seed: int | None = None  # tests only (the completion of a too-small basis); secret

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.lr > 0 or self.sim_steps < 0:
            raise ValueError("lr must be > 0 and sim_steps >= 0")


class LowRankBottleneck(nn.Module):
    """h -> up(down(h)); initialised to the whitened principal-subspace projection of sample outputs."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, hidden)

    @torch.no_grad()
    def fit(self, sample: torch.Tensor, source: NoiseStream | torch.Generator) -> LowRankBottleneck:
        mean, basis, std = principal_subspace(sample, self.down.out_features, source)
        self.down.weight.copy_((basis / std).T)
        self.down.bias.copy_(-(mean @ basis) / std)
        self.up.weight.copy_(basis * std)
        self.up.bias.copy_(mean)
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h.float())).to(h.dtype)


def _kept(module: LowRankBottleneck, sample: torch.Tensor) -> float:
    """Fraction of the sample's variance around its mean that the bottleneck's output keeps."""
    with torch.no_grad():
        centred = sample - sample.mean(0)
        err = module(sample) - sample
        return float(1 - err.pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12))


@register_defense("bottleneck")
class BottleneckDefense(Defense):
    Config = BottleneckConfig

    def __init__(self, config: BottleneckConfig | None = None):
        super().__init__(config)
        self.modules: list[LowRankBottleneck] = []
        self.kept_start: list[float] = []
        self.samples: list[torch.Tensor] = []

    def install(self, session) -> None:
        for client in session.clients:
            data = client.batches.data
            sample = head_outputs(client.head, data["input_ids"], data["attention_mask"])
            module = LowRankBottleneck(sample.shape[-1], self.config.rank).fit(
                sample, client_stream(self.config.seed, client.id))
            attach(client, NAME, module, self.config.lr)
            self.modules.append(module)
            self.samples.append(sample)
            self.kept_start.append(_kept(module, sample))

            def project(out: torch.Tensor, batch: Batch, module=module) -> torch.Tensor:
                return module(out)

            client.activation_hooks.append(project)

    def report(self) -> dict:
        kept_end = [_kept(m, s) for m, s in zip(self.modules, self.samples, strict=True)]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"rank": self.config.rank, "variance_kept_start": mean(self.kept_start),
                "variance_kept_end": mean(kept_end)}

    # -- the attacker's simulation ------------------------------------------------------------------------

    def simulate_head(self, head, input_ids, attention_mask, generator):
        sample = head_outputs(head, input_ids, attention_mask)
        module = LowRankBottleneck(sample.shape[-1], self.config.rank).fit(sample, generator)

        def objective(m, out, mask, gen):
            return anchor_loss(m(out), out, mask)

        return simulate(head, NAME, module, objective, input_ids, attention_mask, generator,
                        self.config.sim_steps, self.config.lr)

    def simulate_release(self, head, input_ids, attention_mask, generator):
        from suite.engine.split import position_ids_for

        with torch.no_grad():
            out = head(input_ids, attention_mask, position_ids_for(attention_mask))
            module = getattr(head, NAME, None)
            if module is None:  # a head without the attacker's own bottleneck: fit one on this batch
                module = LowRankBottleneck(out.shape[-1], self.config.rank).fit(out.float()[attention_mask.bool()],
                                                                               generator)
            return module(out)
