"""DP-SGD (Abadi et al. 2016) with Opacus on the weights that training leaves behind: the server's trunk
adapters (``target = "server"``), the clients' trainable head and tail parameters (``"clients"``), or both.

Mechanism. Opacus' ``GradSampleModule`` hooks compute every example's gradient of the trainable parameters
(LoRA's linear layers) and ``DPOptimizer`` clips each to norm ``clip``, adds Gaussian noise of std
``sigma * clip`` to the sum and averages over the expected batch, before the party's own optimiser (AdamW)
steps. The training loop is unchanged: this wraps the parties' trunk / head and tail and their optimisers.

Sensitivity. Clipping bounds one record's effect only if each per-example gradient depends on that record
alone. The plain loss (``causal_lm_loss``) is the batch's token mean, so one record's length rescales every
other record's gradient; under dp_sgd each client trains on ``per_record_lm_loss`` (each record's own token
mean, then the mean over rows: Opacus' ``loss_reduction="mean"``), and the server's per-example gradients,
which come from the clients', inherit it. Nothing else in a pass couples rows (per-token norms, causal
attention under each row's own mask, padding masked out of the loss). A pass that gets no backward (a
rejected step, a dropped pass) leaves Opacus' per-pass state behind; the parties' ``skipped_backward_hooks``
drop it (``forget_pass``).

Accounting. A record of client c is in c's batches only; each of c's steps (one per training step, for the
trunk adapters it trains under serial, batch_parallel or per_client) samples a batch of B of its N_c
records. Opacus' RDP accountant gives ε at δ for noise multiplier ``sigma``, sample rate q = B / N_c and the
steps taken; the report keeps the worst client. Each step clips a record once per part under DP-SGD (each
pipeline stage's adapters, the head and tail): together one Gaussian mechanism of noise multiplier
sigma / sqrt(parts), which the accountant is given. The sampling amplification assumes Poisson sampling; the
batches here are shuffled without replacement each epoch (as in most DP-SGD code), so ``epsilon`` is the usual
approximation, and ``epsilon_without_amplification`` (q = 1: every step may touch the record) is the bound
that needs no sampling assumption. Both are reported.

What it protects, and what not. It bounds what the *weights* say about a record: the trunk adapters an
``adapter_thief`` steals, the head and tail of a released model. It does nothing against the server itself,
which sees every activation and gradient in clear while training (the report says so), nor, with
``target = "server"``, for the clients' own heads and tails in a released model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from suite.errors import ConfigError
from suite.interfaces.defense import Defense, DefenseConfig, register_defense

TARGETS = ("server", "clients", "both")
# The memorisation views (suite.experiment.memorisation): the server's adapters (an adapter thief), a colluder's
# model (its own head and tail on the trunk), the released model (the victim's head and tail on the trunk).
ALL_VIEWS = ("server_adapters", "colluder_model", "released_model")


def covered_views(target: str, other_side_trains: bool | None) -> tuple[str, ...]:
    """The views whose ε holds: DP-SGD bounds a record's effect on a part only if every other record's
    per-example gradient is a function of that record's own data and of what was already released under DP.
    A part trained *without* DP (the clients' head and tail under target = "server", the server's adapters
    under "clients") is a function of every record, and every other record's gradient flows through it, so
    the sum's sensitivity is no longer ``clip``: no view is covered. So ε holds for every view under "both",
    or under one side when the other trains nothing (``other_side_trains`` False); unknown (None) covers
    nothing."""
    if target == "both" or other_side_trains is False:
        return ALL_VIEWS
    return ()


@dataclass(frozen=True)
class DPSGDConfig(DefenseConfig):
    sigma: float = 1.0  # noise multiplier: noise std = sigma x clip
    clip: float = 1.0  # per-example gradient norm bound
    delta: float = 1e-5
    target: str = "server"  # server | clients | both

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        for name in ("sigma", "clip", "delta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0 (DP-SGD needs a finite sensitivity), got {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


def epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` sampled Gaussian mechanisms (Opacus' RDP accountant); ∞ without noise, 0 without steps."""
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def _per_example(modules, optimizer, cfg: DPSGDConfig, batch_size: int | None):
    """Hook ``modules`` for per-example gradients (every LoRA adapter set, active or not, so per_client's
    sets are all covered) and wrap ``optimizer`` in Opacus' DPOptimizer. ``batch_size`` None: each step
    averages over the rows of its own pass (a networked server, which does not know the clients' batches)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    wrapped = []
    for module in modules:
        was = {p: p.requires_grad for p in module.parameters()}
        for name, p in module.named_parameters():  # inactive adapter sets too: their hooks are made now
            if "lora_" in name:
                p.requires_grad_(True)
        try:
            problems = ModuleValidator.validate(module, strict=False)
            if problems:
                raise ValueError(f"dp_sgd cannot compute per-example gradients here ({problems[0]}); "
                                 "use finetune = \"lora\" for the parts it protects")
            # loss_reduction "mean": the loss is the mean over rows of each row's own loss (per_record_lm_loss)
            wrapped.append(GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=False))
        finally:
            for p, g in was.items():
                p.requires_grad_(g)
    return wrapped, _stream_dp_optimizer(optimizer, noise_multiplier=cfg.sigma, max_grad_norm=cfg.clip,
                                       expected_batch_size=batch_size)


def forget_pass(modules) -> None:
    """Drop what Opacus' hooks kept of a forward pass that gets no backward (a rejected step, a dropped
    pass): the stored activations, each parameter's pending forward count and partial per-example gradient.
    Without this, the next backward pairs its gradients with the stale activations and fails."""
    for module in modules:
        for sub in module.modules():
            if hasattr(sub, "activations"):
                sub.activations = []
            for p in sub.parameters(recurse=False):
                if hasattr(p, "_forward_counter"):
                    p._forward_counter = 0
                if hasattr(p, "_current_grad_sample"):
                    del p._current_grad_sample
                p.grad_sample = None


def _stream_dp_optimizer(optimizer, *, expected_batch_size: int | None, **kwargs):
    """Opacus' DPOptimizer whose Gaussian noise comes from a ChaCha20 stream keyed from ``os.urandom``
    (``suite.engine.noise``), never from torch's global generator, which the run's seed makes predictable.
    ``expected_batch_size`` None: the rows of each step's pass."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    from suite.engine.noise import NoiseStream

    class StreamDPOptimizer(DPOptimizer):
        stream = NoiseStream.fresh()
        rows_of_pass = expected_batch_size is None

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = self.stream.normal(p.summed_grad.shape).to(p.summed_grad) * std
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

        def clip_and_accumulate(self) -> None:
            if self.rows_of_pass:
                self.expected_batch_size = int(self.grad_samples[0].shape[0])
            super().clip_and_accumulate()

    return StreamDPOptimizer(optimizer, expected_batch_size=expected_batch_size or 1, **kwargs)


def _lora_only(*modules) -> bool:
    """Whether ``modules`` train something, and only LoRA adapters (what dp_sgd computes per-example
    gradients of)."""
    names = [n for m in modules for n, p in m.named_parameters() if p.requires_grad]
    return bool(names) and all("lora_" in n for n in names)


def _stages(server) -> list:
    """The server parties whose trunk adapters train here: one Server, each stage of an in-process pipeline
    (StageChain.stages), or the one stage a ``serve --stage i`` process runs (StageNode.stages)."""
    stages = getattr(server, "stages", None)
    if stages is None:
        return [server]
    if not isinstance(stages, list | tuple) or not stages:
        raise TypeError(f"dp_sgd: {type(server).__name__}.stages must list its Server parties, not {stages!r}")
    return list(stages)


@register_defense("dp_sgd")
class DPSGDDefense(Defense):
    Config = DPSGDConfig

    def __init__(self, config: DPSGDConfig | None = None):
        super().__init__(config)
        self._session = None
        self._hooked: list = []  # the GradSampleModules (their hooks live on the parties' modules)
        self._stage_count = 1  # the server's pipeline stages (each clips and noises its own part)
        self._client = None  # a networked client's own Client (install_client)
        self._other_side_trains: bool | None = None  # whether the side target leaves out trains (None: unknown)

    def install(self, session) -> None:
        cfg = self.config
        if cfg.target in ("server", "both"):
            if session.config.finetune.server != "lora":
                raise ValueError("dp_sgd on the server needs server_finetune = \"lora\" (per-example gradients of "
                                 "LoRA layers); the server trains nothing else here")
            # the rows of one server pass: every client's batch at once under batch_parallel
            batch = session.config.batch_size * (len(session.clients) if session.config.strategy == "batch_parallel"
                                                 else 1)
            self._install_server(session.server, batch)
        if cfg.target in ("clients", "both") and session.config.finetune.client != "lora":
            raise ValueError("dp_sgd on the clients needs finetune = \"lora\"")
        for client in session.clients:
            self._install_client(client)
        self._session = session
        self._stage_count = len(_stages(session.server))
        if cfg.target == "server":
            self._other_side_trains = any(p.requires_grad for c in session.clients
                                          for m in (c.head, c.tail) for p in m.parameters())
        elif cfg.target == "clients":
            self._other_side_trains = any(p.requires_grad for stage in _stages(session.server)
                                          for p in stage.trunk.parameters())

    def _install_server(self, server, batch: int | None) -> None:
        """DP-SGD on the trunk adapters of ``server`` (each stage's, in a pipeline)."""
        for stage in _stages(server):
            hooked = []
            for name, opt in list(stage.optimizers.items()):
                if opt is not None:  # per_client: one optimiser per adapter set, one set of hooks on the trunk
                    new, stage.optimizers[name] = _per_example([] if hooked else [stage.trunk], opt, self.config,
                                                               batch)
                    hooked += new
            if stage.adapters:
                stage._activate(next(iter(stage.adapters.values())))  # restore one active set
            stage.skipped_backward_hooks.append(lambda hooked=tuple(hooked): forget_pass(hooked))
            self._hooked += hooked

    def _install_client(self, client) -> None:
        """Every dp_sgd client trains on each record's own loss (so the server's per-example gradients, which
        come from the client's, are independent too); with target clients / both its head and tail train
        under DP-SGD."""
        from suite.engine.parties import per_record_lm_loss

        client.loss = per_record_lm_loss
        client.batches.distinct = True  # a record at most once in a step's batch: clipped once, sensitivity clip
        if self.config.target in ("clients", "both") and client.optimizer is not None:
            hooked, client.optimizer = _per_example([client.head, client.tail], client.optimizer, self.config,
                                                    client.batches.batch_size)
            client.skipped_backward_hooks.append(lambda: forget_pass(hooked))
            self._hooked += hooked

    # -- networked mode: each side its own part, from its own objects --------------------------------------

    def install_server(self, server) -> None:
        if self.config.target in ("server", "both"):
            if not all(_lora_only(stage.trunk) for stage in _stages(server)):
                raise ConfigError("dp_sgd on the server needs server_finetune = \"lora\" (per-example gradients of "
                                  "LoRA layers)")
            self._install_server(server, None)  # each pass averages over its own rows
            self._stage_count = len(_stages(server))

    def install_client(self, client, remote) -> None:
        if self.config.target in ("clients", "both") and not _lora_only(client.head, client.tail):
            raise ConfigError("dp_sgd on the clients needs finetune = \"lora\" (per-example gradients of LoRA "
                              "layers)")
        self._install_client(client)
        self._client = client  # its report: this client's records, its own steps
        # each pipeline stage behind the link clips and noises its own part: count them all in this client's ε
        self._stage_count = max(1, int(getattr(remote, "stages", 1)))

    def report(self) -> dict:
        cfg = self.config
        out = {"mechanism": "DP-SGD (Opacus: per-example clipping, Gaussian noise, RDP accountant)",
               "target": cfg.target, "sigma": cfg.sigma, "clip": cfg.clip, "delta": cfg.delta,
               "covers_views": list(covered_views(cfg.target, self._other_side_trains)),
               "does_not_cover": "the server itself: it sees every activation and gradient in clear while "
                                 "training"}
        if cfg.target != "both" and self._other_side_trains is not False:
            other = "clients' heads and tails" if cfg.target == "server" else "server's trunk adapters"
            out["does_not_cover"] += (f"; any view, because the {other} train without DP (target = "
                                      f"\"{cfg.target}\"): every record's gradient flows through them, so one "
                                      "record moves the clipped sum by more than clip. Use target = \"both\", or "
                                      "freeze the other side")
            out["guarantee"] = f"none: the {other} train on the records without DP"
        s = self._session
        if s is None and self._client is None:
            return out
        steps, rates = [], []
        for client in s.clients if s is not None else [self._client]:
            n = client.batches.size
            rates.append(min(1.0, client.batches.batch_size / n))
            # the server steps on a client's rows in every step it serves, rejected by the client or not
            served = len(s.losses) if s is not None else client.optimizer_steps + len(client.rejected_steps)
            steps.append(client.optimizer_steps if cfg.target == "clients" else max(client.optimizer_steps, served))
        # Each step clips a record's gradient once per part that trains under DP-SGD (each pipeline stage's
        # trunk adapters, the client's head and tail) and noises each part: together one Gaussian mechanism of
        # sensitivity sqrt(parts) x clip, i.e. noise multiplier sigma / sqrt(parts).
        parts = {"server": self._stage_count, "clients": 1, "both": self._stage_count + 1}[cfg.target]
        sigma = cfg.sigma / math.sqrt(parts)
        eps = [epsilon(sigma, q, k, cfg.delta) for q, k in zip(rates, steps, strict=True)]
        worst = max(range(len(eps)), key=lambda i: eps[i])
        out.update(epsilon=eps[worst], sample_rate=rates[worst], steps=steps[worst],
                   epsilon_without_amplification=epsilon(sigma, 1.0, steps[worst], cfg.delta),
                   clipped_parts=parts, effective_sigma=sigma,
                   accounting="sample rate B / N_c of the worst client, amplification by sampling assumed "
                              "(batches are shuffled, not Poisson-sampled); epsilon_without_amplification "
                              "needs no such assumption; each record is clipped once per part (clipped_parts: "
                              "pipeline stages, head and tail), so the noise multiplier is sigma / sqrt(parts)",
                   covers={"server": "the server's trunk adapters", "clients": "the clients' heads and tails",
                           "both": "the server's trunk adapters and the clients' heads and tails"}[cfg.target])
        return out
