"""Running one party per process: `splitleak serve` and `splitleak client`.

Both sides build the experiment from the same config file exactly as the in-process engine does (same
model, split, adapters, seeds and data shards), then keep only their own part: the server its trunk, a
client its head, tail and shard. So a run across processes trains the same model as the in-process run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from suite.engine.step import training_step
from suite.errors import SplitleakError
from suite.experiment.config import ExperimentConfig
from suite.net import checkpoint
from suite.net.certs import client_name, load_identity
from suite.net.defended import choose_defense, describe, key_exchange, label
from suite.net.link import DEFAULT_MAX_MESSAGE_MIB, Link, LinkError, RemoteTransport


def stage_layout(cfg: ExperimentConfig, split) -> list[tuple[int, int]] | None:
    """With ``[training] stages`` = S > 1: each stage's ``(first block, end block)``, which every party must
    agree on (``config_hash``); None for one server."""
    if cfg.training.stages <= 1:
        return None
    from suite.engine.stages import stage_bounds

    return stage_bounds(cfg.training.head_blocks, len(split.server_trunk.blocks.layers), cfg.training.stages)


def config_hash(cfg: ExperimentConfig, defense=None, layout: list[tuple[int, int]] | None = None) -> str:
    """What client and server must agree on: model, data and training, except the number of steps each side
    runs, and the defense with its public parameters (``suite.net.defended.describe``; ``none`` leaves the
    hash as it was without one). The matrix and executor sections do not touch a training run and are left
    out, and so are the devices (each side chooses its own; the dtype must agree). ``layout``: the pipeline
    stages' blocks (``stage_layout``), with S itself in ``training``."""
    data = cfg.model_dump(include={"model", "data", "training"})
    if layout is not None:
        data["stage_layout"] = [list(b) for b in layout]
    data["training"].pop("steps", None)
    if not cfg.training.full_lr_used():  # as in cell keys: a rate that trains nothing leaves the hash as it was
        data["training"].pop("full_lr", None)
    data["model"].pop("device", None)  # each side computes where it likes: tensors cross as bytes
    data["model"].pop("server_device", None)
    if defense is not None and defense.name != "none":
        data["defense"] = describe(defense)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refuse_unsafe_seeds(cfg: ExperimentConfig) -> None:
    """A deployment must never fix a defense's noise seed: the server holds the config and could redraw the
    noise. Such configs are for reproducible tests only."""
    from suite.interfaces.defense import unsafe_seeds

    named = unsafe_seeds(cfg.matrix.defenses)
    if named:
        raise SplitleakError(f"defense {named[0]!r} fixes its noise 'seed', which lets the server regenerate the "
                             "noise: remove 'seed' from the config (it is for tests only)")


def _prepare(cfg: ExperimentConfig, role: str = "server"):
    """Build the run on this process's own device: the server's (``server_device``, else ``device``) in
    ``serve``, the client's (``device``) in ``client``; the other side's parts are built there too but unused."""
    from suite.engine.split import SplitSpec
    from suite.experiment.prepared import prepare

    own = cfg.model.device if role == "client" else (cfg.model.server_device or cfg.model.device)
    model = cfg.model.model_copy(update={"device": own, "server_device": None})
    cfg = cfg.model_copy(update={"model": model})
    return prepare(cfg, SplitSpec(cfg.training.head_blocks, cfg.training.tail_blocks))


def build_service(cfg: ExperimentConfig, checkpoint_dir: str | Path | None = None, *, turn_timeout: float = 30.0,
                  round_timeout: float = 30.0, checkpoint_every: int = 1, bound_margin: float | None = None,
                  defense=None, stage=None):
    """The service for ``cfg`` under ``defense`` (``suite.net.defended.choose_defense``; default: the
    config's). Every message it accepts is bounded (``suite.net.server.public_bounds``): rows by the batch
    size, length by ``max_length``, magnitude by ``bound_margin`` (default 100) times the largest
    per-position norm of the public base model's activations and gradients on public text, widened to what
    the defense's public parameters allow an honest message (``Defense.server_bounds``: noise)."""
    from suite.net.server import DEFAULT_BOUND_MARGIN, SplitService, public_bounds

    defense = choose_defense(cfg) if defense is None else defense
    if (cfg.training.stages > 1) != (stage is not None):
        raise SplitleakError(f"training.stages = {cfg.training.stages}: run each stage as its own process, "
                             "`splitleak serve --stage i` (stage 0 serves the clients)" if stage is None else
                             "a pipeline stage needs training.stages > 1")
    prepared = _prepare(cfg)
    server = prepared.session.server if stage is None else stage(prepared)
    margin = DEFAULT_BOUND_MARGIN if bound_margin is None else bound_margin
    bounds = public_bounds(prepared.session.split, prepared.loaded.tokenizer, cfg.data.max_length,
                           cfg.training.batch_size, margin)  # before a checkpoint restores trained adapters
    bounds = defense.server_bounds(bounds, prepared.loaded.model.config.hidden_size)
    defense.install_server(server)
    name = "server" if stage is None else "stage-0"
    path = Path(checkpoint_dir) / f"{name}.pt" if checkpoint_dir else None
    layout = stage_layout(cfg, prepared.session.split)
    return SplitService(server, cfg.training.strategy, cfg.training.clients,
                        config_hash(cfg, defense, layout), key_exchange=key_exchange(describe(defense)), turn_timeout=turn_timeout,
                        round_timeout=round_timeout, checkpoint_path=path, checkpoint_every=checkpoint_every,
                        bounds=bounds, defense_label=label(defense))


def serve(cfg: ExperimentConfig, certs: str | Path, listen: str, checkpoint_dir: str | Path | None = None,
          *, max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB, on_ready: Callable[[int, list[str]], None] | None = None,
          defense=None, capture: str | Path | None = None, stage=None, **timeouts) -> None:
    """Serve until interrupted. ``capture``: write the server's view (every client's plaintext messages, as
    it decrypted and answered them) to that file (``suite.engine.capture``). ``stage``: the first of S > 1
    pipeline stages (``suite.net.stages.serve_stage``), under the identity ``stage-0``."""
    from suite.net.server import start_server

    refuse_unsafe_seeds(cfg)
    defense = choose_defense(cfg) if defense is None else defense
    identity = load_identity(certs, "server" if stage is None else "stage-0")
    service = build_service(cfg, checkpoint_dir, defense=defense, stage=stage, **timeouts)
    service.events.append(f"defense: {label(defense)}")
    writer = None
    if capture is not None:
        from suite.engine.capture import CaptureWriter

        writer = CaptureWriter(capture, {"model": cfg.model.name, "head_blocks": cfg.training.head_blocks,
                                         "tail_blocks": cfg.training.tail_blocks, "max_length": cfg.data.max_length,
                                         "config": service.config_hash, "defense": describe(defense),
                                         "view": "server"})
        service.queue.add_tap(lambda frame: writer.frame(frame.src, frame.dst, frame.data))
    server, port = start_server(service, identity, listen, max_message_mib=max_message_mib)
    try:
        serve_until_stopped(server, port, service.events, on_ready)
    finally:
        if writer is not None:
            writer.close()


def serve_until_stopped(server, port: int, events, on_ready: Callable[[int, list[str]], None] | None) -> None:
    """Announce a started gRPC ``server`` and serve until it terminates or an interrupt arrives; from the
    start, an interrupt at any point stops the server's threads (or the process never exits)."""
    try:
        if on_ready is not None:
            on_ready(port, list(events))
        server.wait_for_termination()
    finally:
        server.stop(grace=1).wait(10)


@dataclass
class ClientRun:
    client_id: int
    losses: list[float] = field(default_factory=list)  # one per step, from the first step ever (incl. resumed)
    resumed_from: int = 0
    reconnects: int = 0
    defense: str = "none"  # the defense this client ran (``suite.net.defended.label``)
    defense_report: dict = field(default_factory=dict)  # what it measured or guarantees (e.g. DP epsilon)


def run_client(cfg: ExperimentConfig, client_id: int, address: str, certs: str | Path,
               checkpoint_dir: str | Path | None = None, *, max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB,
               give_up_after: float = 300.0, checkpoint_every: int = 1,
               on_step: Callable[[int, float], None] | None = None, defense=None,
               capture: str | Path | None = None) -> ClientRun:
    """Train client ``client_id`` against the server at ``address`` for the config's steps under ``defense``
    (``suite.net.defended.choose_defense``; default: the config's), resuming from its checkpoint when there is
    one, reconnecting (new channel) whenever the server goes away. ``capture``: write every message this
    client sends and receives, and its own batches, to that file (``suite.engine.capture``)."""
    if not 0 <= client_id < cfg.training.clients:
        raise SplitleakError(f"--id {client_id} is not a client of this config (it has {cfg.training.clients}: "
                             f"0..{cfg.training.clients - 1})")
    refuse_unsafe_seeds(cfg)
    defense = choose_defense(cfg) if defense is None else defense
    identity = load_identity(certs, client_name(client_id))
    prepared = _prepare(cfg, "client")
    client = prepared.session.clients[client_id]
    link = Link(address, identity, max_message_mib=max_message_mib)
    transport = RemoteTransport(link, client_id, config_hash(cfg, defense, stage_layout(cfg, prepared.session.split)),
                                describe(defense))
    client.transport = transport
    # The client's part of the defense, before a checkpoint restores its optimiser (DP rebuilds it). The
    # audit's replica is this process's own copy of the trunk as the public config builds it, before training
    # (never the server's); its reveals cross the link.
    from suite.interfaces.defense import RemoteServer

    defense.install_client(client, RemoteServer(prepared.session.server.trunk, transport.reveal,
                                                dict(prepared.session.server.adapters), cfg.training.stages))
    prepared.session.server = None  # nothing here may stand for the server (the replica was copied above)
    writer = None
    if capture is not None:
        from suite.engine.capture import CaptureWriter, CapturingTransport

        writer = CaptureWriter(capture, {"model": cfg.model.name, "head_blocks": cfg.training.head_blocks,
                                         "tail_blocks": cfg.training.tail_blocks, "max_length": cfg.data.max_length,
                                         "config": transport.config_hash, "defense": describe(defense),
                                         "view": "client"})
        client.transport = CapturingTransport(transport, writer)
    path = Path(checkpoint_dir) / f"{client_name(client_id)}.pt" if checkpoint_dir else None
    run = ClientRun(client_id)
    modules = {"head": client.head, "tail": client.tail}
    state = checkpoint.load(path) if path else None
    if state is not None:
        if state["config"] != transport.config_hash:
            raise SplitleakError(f"checkpoint {path} belongs to another config; delete it or use another --checkpoint")
        checkpoint.load_trainable(modules, state["weights"])
        if client.optimizer is not None and state["optimizer"]:
            client.optimizer.load_state_dict(state["optimizer"])
        client.batches.generator.set_state(state["rng"])
        client.batches._order = list(state["order"])
        run.losses = list(state["losses"])
        run.resumed_from = len(run.losses)

    def save(done: int) -> None:
        if path is None:
            return
        checkpoint.save(path, {
            "config": transport.config_hash, "weights": checkpoint.trainable_state(modules),
            "optimizer": client.optimizer.state_dict() if client.optimizer is not None else {},
            "rng": client.batches.generator.get_state(), "order": list(client.batches._order),
            "losses": run.losses[:done],
        })

    def connect() -> None:
        deadline = time.monotonic() + give_up_after
        while True:
            try:
                transport.connect(hello_timeout=max(1.0, deadline - time.monotonic()))
                return
            except LinkError as err:
                if not err.transient or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    connect()
    try:
        for step in range(run.resumed_from, cfg.training.steps):
            batch = client.batches.next()
            if writer is not None:  # this client's own batch: the truth an audit of its traffic scores against
                writer.truth(client_id, step, batch.input_ids, batch.attention_mask)
            deadline = time.monotonic() + give_up_after
            while True:
                try:
                    [loss] = training_step([client], None, step, [batch])  # the server's half runs there
                    break
                except LinkError as err:  # the server restarted, timed our turn out, or is unreachable
                    if not err.transient or time.monotonic() >= deadline:
                        raise
                    run.reconnects += 1
                    transport._out = None
                    time.sleep(0.2)
                    connect()
            run.losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            if (step + 1) % checkpoint_every == 0 or step + 1 == cfg.training.steps:
                save(step + 1)
    finally:
        link.close()
        if writer is not None:
            writer.close()
    run.defense, run.defense_report = label(defense), defense.report()
    return run
