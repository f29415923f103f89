"""Building a split-training session and the three strategies of FL-GLM.

* ``serial`` — the server serves one client after another; one shared set of server-side adapters.
* ``batch_parallel`` — the server concatenates the M clients' activations along the batch, runs the trunk
  once, and splits the gradients back per client; its adapters receive the sum of the clients' gradients.
* ``per_client`` — one server-side LoRA adapter set per client on one shared frozen base (FL-GLM's
  "server-hierarchical" mode without M copies of the model). In one process the clients take turns; their
  server-side weights never mix.

Each strategy is one function that runs one step for every client, through the one protocol step
(``suite.engine.step.training_step``); ``train`` is the loop around it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from suite.engine.device import module_device
from suite.engine.parties import Batch, Batches, Client, Server, trainable
from suite.engine.split import Family, ServerTrunk, SplitModel, SplitSpec, lora_targets, split_model
from suite.engine.stages import StageChain, build_chain
from suite.engine.step import local_forward, training_step
from suite.engine.transitions import PublicParty
from suite.engine.transport import InProcessTransport, Transport
from suite.errors import ConfigError


@dataclass(frozen=True)
class FinetuneConfig:
    """How each party trains. ``client``: "lora" (default) or "full" (every head and tail weight, needed by
    FSHA's hijacking of a trainable head). ``server``: "lora", "full" or "frozen"."""

    client: str = "lora"
    server: str = "lora"
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-3
    full_lr: float | None = None  # the rate of a part trained in full ("full"); None: lr
    targets: str = "attention"  # LoRA on the attention projections (peft's default) or "all" linear layers

    def lr_of(self, mode: str) -> float:
        """The learning rate of a party that trains as ``mode`` ("lora", "full" or "frozen")."""
        return self.full_lr if mode == "full" and self.full_lr is not None else self.lr

    def __post_init__(self) -> None:
        if self.client not in ("lora", "full", "frozen"):
            raise ConfigError(f"finetune client must be 'lora', 'full' or 'frozen', not {self.client!r}")
        if self.server not in ("lora", "full", "frozen"):
            raise ConfigError(f"finetune server must be 'lora', 'full' or 'frozen', not {self.server!r}")
        if self.targets not in ("attention", "all"):
            raise ConfigError(f"LoRA targets must be 'attention' or 'all', not {self.targets!r}")
        if self.rank < 1 or self.lr <= 0 or (self.full_lr is not None and self.full_lr <= 0):
            raise ConfigError("finetune rank must be >= 1 and lr (and full_lr where set) > 0")


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = "serial"
    clients: int = 2
    steps: int = 30
    batch_size: int = 4
    fedavg_every: int = 0  # average the clients' trainable weights every N steps (0 = never)
    seed: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    stages: int = 1  # the server's blocks as this many pipeline stage parties (suite.engine.stages)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.clients < 1 or self.steps < 0 or self.batch_size < 1 or self.fedavg_every < 0 or self.stages < 1:
            raise ConfigError("training needs clients >= 1, steps >= 0, batch_size >= 1, fedavg_every >= 0, "
                              "stages >= 1")


@dataclass
class Session:
    """Everything one split-training run holds. Observers (attacks) get taps on ``transport``, not this."""

    split: SplitModel
    clients: list[Client]
    server: Server | StageChain  # S > 1: the stage parties, which look like one server to the clients
    transport: Transport
    config: TrainConfig
    losses: list[list[float]] = field(default_factory=list)  # per step, per client
    # The orchestrator's word on whether the passes it drives now are training passes (``no_updates`` sets it
    # False): an audit asks this, never a party's own ``updates`` flag.
    updates: bool = True
    # The server-side parties' public builds (``suite.engine.transitions.PublicParty``, one per stage), taken
    # at build before any party runs code; only with ``build_session(keep_public=True)`` (a transition audit).
    public: list | None = None


# --- the strategies: one step for every client ---------------------------------------------------


def serial_step(clients: Sequence[Client], server: Server, step: int) -> list[float]:
    # One client after another: each its own trunk pass and server optimiser step.
    return [loss for c in clients for loss in training_step([c], server, step)]


def batch_parallel_step(clients: Sequence[Client], server: Server, step: int) -> list[float]:
    # One trunk pass over all clients' rows, one server optimiser step on the summed gradients.
    return training_step(clients, server, step)


def per_client_step(clients: Sequence[Client], server: Server, step: int) -> list[float]:
    # The message flow is serial; the difference is on the server, which switches to the client's own
    # adapter set and optimiser for each client (see Server.forward).
    return serial_step(clients, server, step)


STRATEGIES: dict[str, Callable[[Sequence[Client], Server, int], list[float]]] = {
    "serial": serial_step,
    "batch_parallel": batch_parallel_step,
    "per_client": per_client_step,
}


# --- building a session --------------------------------------------------------------------------


def lora_config(ft: FinetuneConfig, targets: list[str], fam: Family) -> LoraConfig:
    return LoraConfig(r=ft.rank, lora_alpha=ft.alpha, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=fam.conv1d)


def lora_init_seed(seed: int, key: str) -> int:
    """The seed of one LoRA A matrix: a function of the run's seed and the module's place in the *unsplit*
    model (``"<global block index>.<path inside the block>"``, e.g. ``"7.self_attn.q_proj"``), so the
    initialisation does not depend on how the model is split, in which order parties are built, or which
    party holds the block. The centralised reference derives the same seeds on its own."""
    return int.from_bytes(hashlib.sha256(f"splitleak lora {seed} {key}".encode()).digest()[:8], "little") >> 1


def _lora(module: nn.Module, fam: Family, ft: FinetuneConfig, seed: int, adapter: str = "default") -> None:
    """LoRA on ``module``'s (a part's) blocks; each A matrix drawn as peft draws it (Kaiming-uniform, a = √5)
    from its own generator (``lora_init_seed``), B zero as peft sets it."""
    targets = lora_targets(module, fam, ft.targets)
    if not targets:
        return
    with warnings.catch_warnings():
        # peft warns when a second adapter set joins a module: per_client does that on purpose.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(lora_config(ft, targets, fam), module, adapter_name=adapter)
    first = module.blocks.first
    for name in targets:
        index, inner = name.removeprefix("blocks.layers.").split(".", 1)
        weight = module.get_submodule(name).lora_A[adapter].weight
        generator = torch.Generator().manual_seed(lora_init_seed(seed, f"{first + int(index)}.{inner}"))
        with torch.no_grad():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


def build_session(
    model: nn.Module,
    spec: SplitSpec,
    shards: Sequence[dict[str, torch.Tensor]],
    config: TrainConfig,
    transport: Transport | None = None,
    *,
    client_device: torch.device | str | None = None,
    server_device: torch.device | str | None = None,
    keep_public: bool = False,
) -> Session:
    """Carve ``model``, give every client its own copy of head and tail, attach adapters, wire it up.

    ``shards[i]`` is client i's tokenised private data (``suite.experiment.data.tokenize``). The base weights are
    frozen; only adapters (or, with ``finetune.client == "full"``, the client's whole head and tail) train.
    ``client_device`` / ``server_device``: where the clients' parts and the server's trunk compute (default:
    where ``model`` is); the shards stay on the host and each batch moves to its client's device.
    ``keep_public``: also keep every server-side party's public build (``Session.public``: a copy of its
    trunk as built, before any party code runs), which a transition audit replays on.
    """
    if len(shards) != config.clients:
        raise ConfigError(f"{config.clients} clients need {config.clients} data shards, got {len(shards)}")
    torch.manual_seed(config.seed)
    ft = config.finetune
    trains = ft.client != "frozen" or ft.server != "frozen"
    if next(model.parameters()).dtype == torch.float16 and config.steps and trains:
        raise ConfigError("float16 weights cannot be fine-tuned here: AdamW's eps underflows in float16 and one "
                          "step turns the adapters non-finite; use dtype = \"bfloat16\" or \"float32\"")
    model.requires_grad_(False)
    split = split_model(model, spec)
    transport = transport if transport is not None else InProcessTransport()
    home = module_device(model)
    client_device = torch.device(client_device) if client_device is not None else home
    server_device = torch.device(server_device) if server_device is not None else home

    clients = []
    for i, shard in enumerate(shards):
        # Under LoRA (or frozen) the clients' base weights are never written: share them, copy the modules.
        head, tail = split.client_copy(share_frozen=ft.client != "full" and client_device == home)
        for part in (head, tail):
            if ft.client == "full":
                part.requires_grad_(True)
            elif ft.client == "lora":
                _lora(part, split.family, ft, config.seed)
        head.to(client_device), tail.to(client_device)  # in place: a tied embedding / LM head stays tied
        batches = Batches(shard, config.batch_size, seed=config.seed * 1000 + i)
        clients.append(Client(i, head, tail, batches, transport, ft.lr_of(ft.client), device=client_device))

    server = build_server(split, config, transport, device=server_device)
    public = None
    if keep_public:
        parties = server.stages if isinstance(server, StageChain) else [server]
        public = [PublicParty.of(p, ft.lr_of(ft.server)) for p in parties]
    return Session(split, clients, server, transport, config, public=public)


def build_server(split: SplitModel, config: TrainConfig, transport: Transport,
                 device: torch.device | str | None = None) -> Server | StageChain:
    """The server over ``split``'s trunk: shared adapters, or one adapter set per client for ``per_client``;
    the trunk (with its adapters) computes on ``device`` (default: where it is). With ``config.stages`` > 1,
    the trunk's blocks are split into that many stage parties, each adapted and trained on its own."""
    if config.stages > 1:
        return build_chain(split.server_trunk, config.stages,
                           lambda part, wiring: _server(part, split.family, config, transport, device, wiring))
    return _server(split.server_trunk, split.family, config, transport, device, {})


def _server(trunk: ServerTrunk, family: Family, config: TrainConfig, transport: Transport,
            device: torch.device | str | None, wiring: dict) -> Server:
    ft = config.finetune
    adapters = None
    if ft.server == "full":
        trunk.requires_grad_(True)
    elif ft.server == "lora":
        if config.strategy == "per_client" and lora_targets(trunk, family, ft.targets):
            adapters = {i: f"client{i}" for i in range(config.clients)}
            for name in adapters.values():
                _lora(trunk, family, ft, config.seed, adapter=name)
        else:
            _lora(trunk, family, ft, config.seed)
    device = torch.device(device) if device is not None else module_device(trunk)
    trunk.to(device)
    return Server(trunk, transport, ft.lr_of(ft.server), adapters=adapters, device=device, **wiring)


def fedavg(clients: Sequence[Client]) -> None:
    """Average the clients' trainable head and tail weights (LoRA adapters by default). Only client-side
    weights are averaged: split learning cannot average what the server computes per client."""
    groups = [trainable((c.head, c.tail)) for c in clients]
    with torch.no_grad():
        for params in zip(*groups, strict=True):
            mean = torch.stack([p.data for p in params]).mean(0)
            for p in params:
                p.data.copy_(mean)


@dataclass(frozen=True)
class StepLog:
    step: int
    losses: list[float]
    seconds: float

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)


@contextlib.contextmanager
def no_updates(session: Session):
    """Within the block, the parties run the protocol exactly (every message computed and sent, the server's
    policy included) but no party takes an optimiser step: capturing traffic adds no training."""
    parties = [*session.clients, session.server]
    before = [p.updates for p in parties]
    was_session = session.updates
    for p in parties:
        p.updates = False
    session.updates = False
    try:
        yield session
    finally:
        session.updates = was_session
        for p, was in zip(parties, before, strict=True):
            p.updates = was


def optimizer_steps(session: Session) -> dict:
    """Optimiser steps each party took: ``{"server": {adapter set: n}, "clients": [n, ...]}``."""
    return {"server": {str(k) if k is not None else "shared": v for k, v in session.server.optimizer_steps.items()},
            "clients": [c.optimizer_steps for c in session.clients]}


def train(session: Session, steps: int | None = None, on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:
    """Run ``steps`` steps (default: the config's) of the session's strategy; ``on_step`` sees each."""
    cfg = session.config
    step_fn = STRATEGIES[cfg.strategy]
    logs = []
    first = len(session.losses)
    for step in range(first, first + (cfg.steps if steps is None else steps)):
        start = time.perf_counter()
        losses = step_fn(session.clients, session.server, step)
        if cfg.fedavg_every and (step + 1) % cfg.fedavg_every == 0:
            fedavg(session.clients)
        session.losses.append(losses)
        log = StepLog(step, losses, time.perf_counter() - start)
        logs.append(log)
        if on_step is not None:
            on_step(log)
    return logs


def eval_loss(session: Session, data: dict[str, torch.Tensor], client_id: int = 0, batch_size: int = 16,
              deployed: bool = True) -> float:
    """Mean token loss of one client's fine-tuned model (its head and tail, the server's trunk with that
    client's adapters) on ``data``: the utility side of every privacy-utility trade-off. With ``deployed``
    (the default) the forward pass is the one the protocol runs, defenses included (see ``eval_losses``)."""
    sums, counts = _eval_sums(session, data, client_id, batch_size, deployed)
    return float(sums.sum() / counts.sum().clamp_min(1))


def eval_losses(session: Session, data: dict[str, torch.Tensor], client_id: int = 0, batch_size: int = 16,
                deployed: bool = True) -> torch.Tensor:
    """Per-sequence mean token loss [N'] on ``data`` (sequences without a target token left out), for
    intervals over held-out sequences. ``deployed``: run every client hook that changes what is sent
    (token replacement, input-embedding noise, what the activation hooks do to the head output: DP noise,
    bottlenecks), with the clients' own randomness, as the deployed protocol would; the loss is always taken
    against the true text. ``deployed=False`` is the bare fine-tuned model (for comparison only)."""
    sums, counts = _eval_sums(session, data, client_id, batch_size, deployed)
    keep = counts > 0
    return sums[keep] / counts[keep]


@torch.no_grad()
def _eval_sums(session: Session, data: dict[str, torch.Tensor], client_id: int, batch_size: int,
               deployed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and target count per sequence. Runs locally, not over the wire: evaluation is not
    part of the protocol being attacked, but it computes exactly what the protocol would."""
    client = session.clients[client_id]
    server = session.server
    server.activate_for(client_id)
    sums, counts = [], []
    n = data["input_ids"].shape[0]
    for lo in range(0, n, batch_size):
        b = Batch(*(data[k][lo : lo + batch_size] for k in ("input_ids", "attention_mask", "labels")))
        b = b.to(client.device)
        labels = b.labels  # the true text, whatever a token hook sends in its place
        logits = local_forward(client, server, b, deployed)
        targets = labels[:, 1:]
        token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")
        valid = targets != -100
        sums.append((token_loss * valid).sum(1))
        counts.append(valid.sum(1))
    return torch.cat(sums).double(), torch.cat(counts).double()


def eval_summary(session: Session, data: dict[str, torch.Tensor], client_id: int = 0,
                 deployed: bool = True) -> tuple[float, torch.Tensor, list[list[float]]]:
    """``(eval_loss, eval_losses, scores)`` from one deployed pass (one draw of the defenses' randomness);
    ``scores`` holds (summed loss, target tokens) per sequence, so a utility interval resamples sequences."""
    sums, counts = _eval_sums(session, data, client_id, 16, deployed)
    keep = counts > 0
    scores = torch.stack([sums[keep], counts[keep]], 1).tolist()
    return float(sums.sum() / counts.sum().clamp_min(1)), sums[keep] / counts[keep], scores
