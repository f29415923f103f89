"""A defence simulated on the attacker's own shadow pipeline (the adaptive attacker: it knows the deployed
defence's mechanism and public parameters, ``Observations.defense``, never its secret randomness).

1. ``simulate_shadow``: what would leave a head under the defence for the attacker's shadow batch
   (``Defense.simulate_head`` then ``simulate_release``), randomness from the attacker's own generator;
2. ``split_rows``: a fixed split of the shadow rows into fit and held-out, so every choice (a clean-fit or a
   noise-fit inverter, ridge strengths, the LM-prior weight) is scored on simulated held-out text, never on
   the victims'; the non-adaptive method is always among the candidates, so adapting never ends weaker on the
   attacker's own simulation;
3. ``defense_noise``: the per-dimension variance the defence adds, measured on two independent simulated
   releases (a Gaussian likelihood's weighting for scores that compare head outputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from suite.interfaces.defense import Defense
from suite.interfaces.threats import Observations


def defended(obs: Observations) -> bool:
    """True when the deployed defense changes what an attacker's simulation sees (it overrides
    ``simulate_head`` or ``simulate_release``). Encryption and detectors do not: the server sees plain
    activations, so an adaptive attack there is its non-adaptive self (without the LM prior's cost)."""
    d = obs.defense
    if d is None:
        return False
    cls = type(d)
    return cls.simulate_release is not Defense.simulate_release or cls.simulate_head is not Defense.simulate_head


def simulate_shadow(obs: Observations, head: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, seed: int,
                    chunk: int = 64) -> torch.Tensor:
    """[N, T, H]: what would leave ``head`` under the deployed defense for the attacker's shadow batch
    (``simulate_head`` on the shadow batch, then ``simulate_release``), randomness from a generator seeded
    by the attacker's own ``seed``."""
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    defense = obs.defense
    sim_head = defense.simulate_head(head, ids, mask, gen)
    out = [defense.simulate_release(sim_head, ids[lo : lo + chunk], mask[lo : lo + chunk], gen).detach().float()
           for lo in range(0, ids.shape[0], chunk)]
    return torch.cat(out)


def split_rows(n: int, seed: int, held_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of the attacker's ``n`` shadow rows into (fit, held-out)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 4049))
    held = max(1, min(n - 1, round(n * held_fraction))) if n > 1 else 0
    return perm[held:], perm[:held]


def defense_noise(obs: Observations, head, ids: torch.Tensor, mask: torch.Tensor, seed: int,
                  then: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Per-dimension variance of what the deployed defense adds to the head output, measured on the attacker's
    own simulation (``Defense.simulate_release`` on shadow text, two independent draws: half the variance of
    their difference) and the simulated releases' statistics. Zero where the defense adds no randomness.
    ``then(release, mask)``: what the attacker observes of a release (e.g. a later block's cached keys and
    values), the variance measured there instead."""
    defense = obs.defense
    g1, g2 = torch.Generator().manual_seed(seed + 101), torch.Generator().manual_seed(seed + 202)
    with torch.no_grad():
        r1 = defense.simulate_release(head, ids, mask, g1).float()
        r2 = defense.simulate_release(head, ids, mask, g2).float()
        if then is not None:
            r1, r2 = then(r1, mask).float(), then(r2, mask).float()
    real = mask.bool()
    var = ((r1 - r2)[real].pow(2).mean(0) / 2).clamp_min(0)
    return var, {"defense": getattr(defense, "name", type(defense).__name__),
                 "simulated_noise_rms": float(var.mean().sqrt())}
