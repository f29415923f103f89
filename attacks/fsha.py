"""Feature-Space Hijacking (FSHA; Pasquini, Ateniese, Bernaschi, CCS 2021), adapted to text.

A malicious server does not train the model it was asked to train: it trains its own autoencoder on public
text and, every time a client head sends activations, returns to that head the gradient of a discriminator
instead of the task gradient, so that the client's own optimiser pulls the head's output space onto the
attacker's feature space. The attacker's decoder then reads the victims' features back to text.

The server's networks, all on the *standardised* feature space ``s(z) = (z - mu) / sd`` (per hidden
dimension, fixed once from the public head's features on the shadow corpus, so the few "massive activation"
dimensions of pretrained LMs do not dominate):

* **pilot encoder f̃** = the public base client head (the attacker knows the base weights; its features on the
  shadow corpus are computed once and cached) followed by a trainable low-rank residual map
  ``z + U V z`` (``U`` starts at zero, so f̃ starts exactly at the base head). It trains with the decoder.
* **decoder f̃⁻¹**: per position, LayerNorm → (linear skip + MLP) → LayerNorm → a vector ``u``; token logits are
  ``scale · u · E_yᵀ + b_y`` against the public input-embedding table ``E`` (rows normalised, frozen, i.e.
  tied to the embedding). Trained as an autoencoder on shadow text with cross-entropy at every real position
  (unshifted: position t decodes token t; padding masked). To stay CPU-affordable with a 49,152-token
  vocabulary the training softmax runs over the tokens of the shadow corpus plus ``negatives`` other tokens
  drawn afresh at each step (a sampled softmax, so unseen tokens are pushed down too); decoding uses the
  full vocabulary.
* **critic D**: a per-position MLP, trained as a WGAN-GP critic to score f̃(shadow) high and the client's
  features low, with gradient penalty ``gp_weight`` on random interpolates (in standardised units the usual
  WGAN-GP weight of 10 works; the paper's ~500 was for images in raw pixel scale). The critic gets a higher lr
  (1e-3) and more steps per batch (5) than the paper's 1e-4 and 1: the client's Adam moves its head by a
  fixed step whatever the gradient's size, and a critic that lags lets the head run off the manifold.

Each time the server backpropagates a client batch (``head_gradient``): ``ae_steps`` autoencoder steps on
shadow batches, ``disc_steps`` critic steps against the client's features, then the reply to the head is
``d(-mean D(s(h)))/dh`` over its real positions — rescaled per row to the norm of the honest gradient, so the
reply looks ordinary in size — instead of the honest gradient. ``on_forward`` stays honest: the client tail
still trains on its task, but the head receives no task signal at all, and the task loss suffers (that is
what ``suite.experiment.cell`` reports as ``utility`` and what the ``fsha_detector`` defense watches). Before training,
``warmup_steps`` autoencoder steps run on public data only.

Reconstruction: f̃⁻¹ applied to the victims' captured head outputs, argmax over the full vocabulary.

What it needs from the client: a trainable head. It works with ``finetune = "full"`` (any k) and with LoRA
on head blocks (k >= 1). At k = 0 under LoRA the head is the bare embedding and has no trainable weights: the
hijacking gradient is ignored, and f̃⁻¹ simply inverts the raw public embedding (trivially invertible: the
``nearest_embedding`` baseline is exact there). Note that because f̃ starts as the public base head, which is
also where every client head starts, the hijacking here mostly *keeps* the head invertible (pulls it back
onto the base features) rather than moving it somewhere new; the price is the head's task learning.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.toolkit.observe import decode_rows, public_head, stacked, tokenize
from suite.engine.split import position_ids_for
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, ServerPolicy, register_attack
from suite.interfaces.threats import Capability, Observations


@dataclass(frozen=True)
class FshaConfig(AttackConfig):
    pilot_lr: float = 1e-4  # Adam lr of the pilot encoder's residual map (0 freezes f̃ at the base head)
    pilot_rank: int = 16  # rank of the pilot encoder's residual map
    decoder_lr: float = 1e-3  # Adam lr of the decoder f̃⁻¹
    decoder_hidden: int = 0  # width of the decoder's MLP (0 = twice the model's hidden size)
    disc_lr: float = 1e-3  # Adam lr of the critic D
    disc_hidden: int = 256  # width of the critic's MLP
    gp_weight: float = 10.0  # WGAN-GP gradient-penalty weight (standardised features)
    ae_steps: int = 2  # autoencoder steps per client batch seen
    disc_steps: int = 5  # critic steps per client batch seen (the client moves fast: the critic must keep up)
    warmup_steps: int = 200  # autoencoder steps on public data before training starts
    shadow_batch: int = 16  # shadow sequences per autoencoder / critic step
    negatives: int = 2048  # tokens outside the shadow vocabulary in each step's sampled softmax
    match_norm: bool = True  # rescale the reply to the honest gradient's norm, row by row
    hijack: bool = True  # False: reply honestly and only train f̃/f̃⁻¹ (a passive learned-inversion ablation)
    # Evasion of gradient-direction detectors (fsha_detector): reply w * honest + (1 - w) * hijack, both at the
    # honest norm. w = 0 is plain FSHA; larger w keeps the cosine to the tail gradient up and the hijack weaker.
    honest_mix: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.honest_mix <= 1.0:
            raise ValueError(f"honest_mix must be in [0, 1], got {self.honest_mix}")
        if min(self.decoder_lr, self.disc_lr) <= 0 or self.pilot_lr < 0:
            raise ValueError("decoder_lr and disc_lr must be > 0, pilot_lr >= 0")
        if min(self.pilot_rank, self.disc_hidden, self.shadow_batch) < 1 or self.decoder_hidden < 0:
            raise ValueError("pilot_rank, disc_hidden and shadow_batch must be >= 1, decoder_hidden >= 0")
        if min(self.ae_steps, self.disc_steps, self.warmup_steps, self.negatives) < 0 or self.gp_weight < 0:
            raise ValueError("step counts, negatives and gp_weight must be >= 0")


class _Pilot(nn.Module):
    """f̃ on top of the (cached, frozen) public head features: ``z + U V z`` in standardised units."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(self.down(z))


class _Decoder(nn.Module):
    """f̃⁻¹: standardised features [..., H] -> a vector scored against the (frozen) embedding rows."""

    def __init__(self, table: torch.Tensor, hidden: int):
        super().__init__()
        dim = table.shape[1]
        self.register_buffer("table", F.normalize(table.float(), dim=-1))  # [V, H] tied to the public embedding
        self.inp = nn.LayerNorm(dim)
        self.skip = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.out = nn.LayerNorm(dim)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(table.shape[0]))

    def logits(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inp(z)
        u = self.out(self.skip(x) + self.mlp(x))
        if rows is None:
            return self.scale * u @ self.table.T + self.bias
        return self.scale * u @ self.table[rows].T + self.bias[rows]


def _critic(dim: int, hidden: int) -> nn.Module:
    # No normalisation layers: WGAN-GP penalises the gradient per sample.
    return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 1))


# The warm-up (public head features on the shadow corpus, then ``warmup_steps`` autoencoder steps) depends
# only on public things: the attack config, the public head's weights, the shadow text and the sequence
# length. A matrix runs FSHA once per defence at each split; each run starts from a copy of the same
# warmed-up state instead of recomputing it (the cells' results are identical either way).
_WARM: dict[str, tuple[dict, torch.Tensor]] = {}


def _warm_key(config: FshaConfig, obs: Observations, head: nn.Module) -> str:
    h = hashlib.sha256(repr(config).encode())
    h.update(repr((obs.spec, obs.max_length, type(obs.tokenizer).__name__, len(obs.tokenizer))).encode())
    for text in obs.shadow:
        h.update(text.encode() + b"\0")
    for name, p in head.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class FshaPolicy(ServerPolicy):
    """The hijacking server. Holds f̃, f̃⁻¹ and D and trains them as it serves client batches."""

    def __init__(self, config: FshaConfig, obs: Observations):
        start = time.perf_counter()
        if not obs.shadow:
            raise ValueError("fsha needs public shadow text to train its autoencoder; the shadow corpus is empty")
        head = public_head(obs)
        key = _warm_key(config, obs, head)
        if key in _WARM:  # the same public warm-up was done before in this process: reuse a copy
            state, generator = _WARM[key]
            self.__dict__.update(copy.deepcopy(state))
            self.generator = torch.Generator().manual_seed(config.seed)
            self.generator.set_state(generator)
            self.warmup_reused = True
            return
        self._warm_up(config, obs, head, start)
        state = {k: v for k, v in self.__dict__.items() if k != "generator"}
        _WARM.clear()  # keep one: a matrix runs one split's cells together
        _WARM[key] = (copy.deepcopy(state), self.generator.get_state())

    def _warm_up(self, config: FshaConfig, obs: Observations, head, start: float) -> None:
        self.config = config
        self.warmup_reused = False
        self.generator = torch.Generator().manual_seed(config.seed)
        self.shadow_ids, self.shadow_mask = tokenize(obs.tokenizer, obs.shadow, obs.max_length)
        with torch.no_grad():
            feats = torch.cat([head(self.shadow_ids[lo : lo + 64], self.shadow_mask[lo : lo + 64],
                                    position_ids_for(self.shadow_mask[lo : lo + 64])).float()
                               for lo in range(0, self.shadow_ids.shape[0], 64)])
            real = feats[self.shadow_mask.bool()]
            self.mu = real.mean(0)
            sd = real.std(0)
            self.sd = sd.clamp_min(float(sd.median()) * 1e-2 + 1e-6)
            table = head.embed.weight.detach().float()
        self.base = self._std(feats)  # [S, T, H] public head on shadow text, standardised
        vocab, dim = table.shape
        self.vocab = vocab
        self.shadow_vocab = self.shadow_ids[self.shadow_mask.bool()].unique()
        inside = torch.zeros(vocab, dtype=torch.bool)
        inside[self.shadow_vocab] = True
        self.outside = (~inside).nonzero().squeeze(1)
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            self.pilot = _Pilot(dim, config.pilot_rank)
            self.decoder = _Decoder(table, config.decoder_hidden or 2 * dim)
            self.critic = _critic(dim, config.disc_hidden)
        groups = [{"params": [*self.decoder.parameters()], "lr": config.decoder_lr}]
        self.pilot.requires_grad_(config.pilot_lr > 0)
        if config.pilot_lr > 0:
            groups.append({"params": [*self.pilot.parameters()], "lr": config.pilot_lr})
        self.ae_opt = torch.optim.Adam(groups, foreach=True)
        self.disc_opt = torch.optim.Adam(self.critic.parameters(), lr=config.disc_lr, betas=(0.5, 0.9),
                                         foreach=True)
        # Diagnostics (Reconstruction.extra).
        self.ae_loss: list[float] = []
        self.ae_acc: list[float] = []
        self.wasserstein: list[float] = []  # critic's estimate, E D(real) - E D(client), per client batch
        self.honest_cos: list[float] = []  # cosine of the reply to the honest gradient, per client batch
        self.hijacked = 0
        for _ in range(config.warmup_steps):
            self._autoencoder_step()
        self.warmup_seconds = time.perf_counter() - start
        self.seconds = 0.0

    def _std(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.mu) / self.sd

    def _shadow_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.base.shape[0]
        idx = torch.randperm(n, generator=self.generator)[: min(self.config.shadow_batch, n)]
        mask = self.shadow_mask[idx].bool()
        return self.base[idx][mask], self.shadow_ids[idx][mask], mask

    def _autoencoder_step(self) -> None:
        feats, targets, _ = self._shadow_batch()
        k = min(self.config.negatives, self.outside.numel())
        neg = self.outside[torch.randperm(self.outside.numel(), generator=self.generator)[:k]]
        rows = torch.cat([self.shadow_vocab, neg])
        lookup = torch.full((self.vocab,), -1, dtype=torch.long)
        lookup[rows] = torch.arange(rows.numel())
        logits = self.decoder.logits(self.pilot(feats), rows)
        loss = F.cross_entropy(logits, lookup[targets])
        self.ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.ae_opt.step()
        self.ae_loss.append(float(loss.detach()))
        self.ae_acc.append(float((rows[logits.argmax(-1)] == targets).float().mean()))

    def _critic_step(self, fake: torch.Tensor) -> float:
        real, _, _ = self._shadow_batch()
        with torch.no_grad():
            real = self.pilot(real)
        n = min(real.shape[0], fake.shape[0])
        real = real[torch.randperm(real.shape[0], generator=self.generator)[:n]]
        fake = fake[torch.randperm(fake.shape[0], generator=self.generator)[:n]]
        eps = torch.rand(n, 1, generator=self.generator)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(mix).sum(), mix, create_graph=True)
        penalty = ((grad.norm(dim=-1) - 1) ** 2).mean()
        gap = self.critic(real).mean() - self.critic(fake).mean()
        loss = -gap + self.config.gp_weight * penalty
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        return float(gap.detach())

    def head_gradient(self, client_ids, step, hidden_in, attention_mask, honest_grad):
        start = time.perf_counter()
        mask = attention_mask.bool()
        with torch.enable_grad():
            for _ in range(self.config.ae_steps):
                self._autoencoder_step()
            fake = self._std(hidden_in.detach())[mask]
            gap = float("nan")
            for _ in range(self.config.disc_steps):
                gap = self._critic_step(fake)
            x = hidden_in.detach().float().requires_grad_(True)
            score = self.critic(self._std(x)).squeeze(-1)
            adversarial = -(score * mask).sum() / mask.sum().clamp_min(1)
            (grad,) = torch.autograd.grad(adversarial, x)
        grad = grad * mask.unsqueeze(-1)
        honest = honest_grad.float() * mask.unsqueeze(-1)
        if not self.config.hijack:
            grad = honest
        if self.config.match_norm:
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * (honest.flatten(1).norm(dim=1) / norms).view(-1, 1, 1)
        if self.config.honest_mix:
            grad = self.config.honest_mix * honest + (1.0 - self.config.honest_mix) * grad
        self.wasserstein.append(gap)
        self.honest_cos.append(float(F.cosine_similarity(grad.flatten(), honest.flatten(), dim=0)))
        self.hijacked += self.config.hijack
        self.seconds += time.perf_counter() - start
        return grad.to(honest_grad.dtype)

    @torch.no_grad()
    def decode(self, hidden: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Token ids [N, T] for head outputs [N, T, H] (full-vocabulary argmax)."""
        flat = self._std(hidden).reshape(-1, hidden.shape[-1])
        ids = torch.cat([self.decoder.logits(self.pilot(flat[lo : lo + chunk])).argmax(-1)
                         for lo in range(0, flat.shape[0], chunk)])
        return ids.reshape(hidden.shape[:-1])


def _summary(values: list[float], n: int = 5) -> dict[str, float]:
    clean = [v for v in values if v == v]
    if not clean:
        return {}
    return {"first": sum(clean[:n]) / len(clean[:n]), "last": sum(clean[-n:]) / len(clean[-n:])}


@register_attack("fsha")
class FshaAttack(Attack):
    requires = frozenset({Capability.CONTROL_SERVER, Capability.ACTIVATIONS, Capability.BASE_WEIGHTS,
                          Capability.SHADOW_DATA})
    Config = FshaConfig
    active = True

    def __init__(self, config: FshaConfig | None = None):
        super().__init__(config)
        self.policy: FshaPolicy | None = None

    @classmethod
    def threat_problem(cls, threat) -> str | None:
        """FSHA steers the clients' heads through the gradient sent back to them, at the head's output: with
        pipeline stages only stage 0 receives that output and answers the heads."""
        if threat.stages and threat.stages[0] != 0:
            return (f"fsha hijacks the clients' heads through the gradient of the head's output, which only stage 0 "
                    f"receives and answers; {threat.name} is not stage 0: use malicious_stage:0")
        return None

    def server_policy(self, obs: Observations) -> ServerPolicy:
        self.policy = FshaPolicy(self.config, obs)
        return self.policy

    def reconstruct(self, obs: Observations) -> Reconstruction:
        policy = self.policy
        note = ""
        if policy is None:  # never installed during training: fall back to the public-data autoencoder
            policy = FshaPolicy(self.config, obs)
            note = "no hijacking happened (the policy was not installed during training); decoder from public data"
        elif obs.spec.head_blocks == 0:
            note = ("embedding-only head: if it trains (finetune = 'full') it was hijacked; under LoRA it has no "
                    "trainable weights and f̃⁻¹ inverts the raw public embedding")
        hidden, mask = stacked(obs)
        ids = policy.decode(hidden).masked_fill(~mask.bool(), obs.tokenizer.pad_token_id or 0)
        extra = {
            "hijacked_batches": policy.hijacked,
            # Utility damage as the server sees it: the head received none of its task gradient (cosine of the
            # reply to the honest gradient ~ 0). The task loss itself is CellResult.utility.
            "honest_gradient_cosine": _summary(policy.honest_cos),
            "wasserstein_estimate": _summary(policy.wasserstein),
            "autoencoder_loss": _summary(policy.ae_loss),
            "autoencoder_shadow_accuracy": _summary(policy.ae_acc),
            "warmup_seconds": policy.warmup_seconds,
            "warmup_reused": policy.warmup_reused,  # a copy of an identical earlier warm-up in this process
            "policy_seconds": policy.seconds,
            "utility": "see CellResult.utility (held-out task loss of the hijacked model); compare an honest run",
        }
        return Reconstruction(ids, decode_rows(obs.tokenizer, ids, mask), note=note, extra=extra)
