"""Shared by the learned defenses (``mid``, ``bottleneck``): a client-owned module on what leaves the head.

The module is attached to the client's head as a submodule, so it is the client's private state: it trains
with the client's optimiser, is saved in the client's checkpoints, averaged by FedAvg and copied with the head,
and never reaches the server. It starts from the principal subspace of the client's own head outputs (over its
shard), so training starts from the best rank-r reconstruction instead of a random projection that would
wreck the pretrained model, and then trains with the task through the server's gradient.

The attacker's simulation (Kerckhoffs): the client's learned weights are private, so the attacker fits its
own module of the same public shape on its shadow text through its own public head, the same way: principal
subspace, then ``sim_steps`` Adam steps on the module's objective with the task replaced by keeping the head's
output (what the frozen rest of the public model expects), as the task does for a real head.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from suite.engine.noise import NoiseStream, as_stream
from suite.engine.parties import make_optimizer
from suite.engine.split import position_ids_for


@torch.no_grad()
def head_outputs(head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 limit: int = 64) -> torch.Tensor:
    """The head's output over (at most ``limit`` rows of) a batch, real positions only: [n, H]."""
    ids, mask = input_ids[:limit], attention_mask[:limit]
    out = head(ids, mask, position_ids_for(mask)).float()
    return out[mask.bool()]


@torch.no_grad()
def principal_subspace(x: torch.Tensor, rank: int, source: NoiseStream | torch.Generator) -> tuple[torch.Tensor, ...]:
    """Mean [H], orthonormal basis [H, r] of the top-r principal directions of ``x`` [n, H] (completed with
    random orthonormal directions when there are fewer than r samples), and each direction's std [r]."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    k = min(rank, vh.shape[0])
    basis, std = vh[:k].T, s[:k] / math.sqrt(max(x.shape[0] - 1, 1))
    if k < rank:
        extra = as_stream(source).normal((x.shape[1], rank - k))
        basis = torch.linalg.qr(torch.cat([basis, extra], 1))[0]
        std = torch.cat([std, std.new_full((rank - k,), float(std.mean()) if k else 1.0)])
    return mean.float(), basis.float(), std.clamp_min(1e-6 * float(std.max().clamp_min(1e-12))).float()


def attach(client, name: str, module: nn.Module, lr: float) -> None:
    """Make ``module`` part of the client's head (its private state) and train it with the client."""
    client.head.add_module(name, module)
    params = list(module.parameters())
    if client.optimizer is None:
        client.optimizer = make_optimizer(params, lr)
    else:
        client.optimizer.add_param_group({"params": params, "lr": lr})


def simulate(head: nn.Module, name: str, module: nn.Module, objective, input_ids: torch.Tensor,
             attention_mask: torch.Tensor, generator: torch.Generator, steps: int, lr: float,
             batch: int = 16) -> nn.Module:
    """A copy of ``head`` carrying the attacker's own ``module`` (already initialised), trained ``steps``
    Adam steps on ``objective(module, head_output, mask, generator)`` over the shadow batch."""
    sim = copy.deepcopy(head).eval()
    sim.requires_grad_(False)
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    n = input_ids.shape[0]
    for _ in range(steps if n else 0):
        idx = torch.randperm(n, generator=generator)[: min(batch, n)]
        ids, mask = input_ids[idx], attention_mask[idx]
        with torch.no_grad():
            out = sim(ids, mask, position_ids_for(mask)).float()
        loss = objective(module, out, mask, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    module.requires_grad_(False)
    sim.add_module(name, module.eval())
    return sim


def anchor_loss(sent: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Relative squared error of what is sent against the head's output, over real positions."""
    m = mask.unsqueeze(-1).to(out.dtype)
    return ((sent - out) * m).pow(2).sum() / (out * m).pow(2).sum().clamp_min(1e-12)
