"""From a validated config to a ready split-training session: model, data shards, clients, server.

Shared by ``splitleak train``, the benchmark and (later) the matrix runner, so every entry point builds
a run the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from suite.engine.models import LoadedModel, load_model
from suite.engine.split import SplitSpec
from suite.engine.training import FinetuneConfig, Session, TrainConfig, build_session
from suite.engine.transport import Transport
from suite.experiment.canaries import Canary, insert, make_canaries
from suite.experiment.config import ExperimentConfig
from suite.experiment.data import Record, load_private, shard, tokenize


def load_for(cfg: ExperimentConfig, **kwargs) -> LoadedModel:
    """The config's model in the config's dtype, on the host (``prepare`` places each party on its device)."""
    from suite.engine.device import resolve_dtype

    return load_model(cfg.model.name, dtype=resolve_dtype(cfg.model.dtype), **kwargs)


def devices(cfg: ExperimentConfig) -> tuple[torch.device, torch.device]:
    """(client device, server device) of a config; an absent device is a one-line ``ConfigError``."""
    from suite.engine.device import resolve_device

    client = resolve_device(cfg.model.device)
    server = resolve_device(cfg.model.server_device) if cfg.model.server_device is not None else client
    return client, server


def train_config(cfg: ExperimentConfig) -> TrainConfig:
    t = cfg.training
    ft = FinetuneConfig(client=t.finetune, server=t.server_finetune, rank=t.lora_rank, alpha=t.lora_alpha, lr=t.lr,
                        full_lr=t.full_lr, targets=t.lora_targets)
    return TrainConfig(strategy=t.strategy, clients=t.clients, steps=t.steps, batch_size=t.batch_size,
                       fedavg_every=t.fedavg_every, seed=t.seed, finetune=ft, stages=t.stages)


@dataclass
class Prepared:
    """A built run: the loaded model, the session and the data each party holds."""

    loaded: LoadedModel
    session: Session
    private: list[list[Record]]  # per client, the records behind its shard (ground truth for metrics)
    eval_data: dict[str, torch.Tensor]  # held-out records of the same kind, for utility
    held_out: list[Record] = field(default_factory=list)  # the records behind ``eval_data`` (membership's non-members)
    canaries: list[Canary] = field(default_factory=list)  # inserted into the last client's shard ([data] canaries)


def prepare(
    cfg: ExperimentConfig,
    spec: SplitSpec,
    *,
    loaded: LoadedModel | None = None,
    transport: Transport | None = None,
    keep_public: bool = False,
) -> Prepared:
    client_device, server_device = devices(cfg)  # refuse an absent device before loading anything
    loaded = loaded if loaded is not None else load_for(cfg)
    # Utility is measured on data.held_out records of the private kind, disjoint from the clients' shards
    # (which are also the victims' records): generated after them, or taken from after them in the file.
    train_records, held_out = load_private(cfg.data.private.spec(), cfg.data.held_out)
    shards = shard(train_records, cfg.training.clients)
    canaries = []
    if cfg.data.canaries is not None:  # into the last client's shard: a victim under every threat
        c = cfg.data.canaries
        canaries = make_canaries(c.count, c.repeats, c.seed, c.format)
        shards[-1] = insert(shards[-1], canaries)
    max_len = cfg.data.max_length
    tokenized = [tokenize(s, loaded.tokenizer, max_len) for s in shards]
    session = build_session(loaded.model, spec, tokenized, train_config(cfg), transport=transport,
                            client_device=client_device, server_device=server_device, keep_public=keep_public)
    return Prepared(loaded, session, shards, tokenize(held_out, loaded.tokenizer, max_len), held_out, canaries)
