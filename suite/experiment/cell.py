"""One cell of the threat-model matrix: train a split model, capture the victims' traffic, attack, score.

The steps are separate so a matrix can train each split once and run every passive attack against the
same capture; an active attack (a deviating server) needs its own training run.

What the runner knows but attacks never see: the parties, the model objects, and the victims' records
(ground truth, used only for metrics here).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from suite.engine.models import LoadedModel
from suite.engine.parties import Batch
from suite.engine.protocol import ActivationMsg, GradientMsg
from suite.engine.split import SplitSpec
from suite.engine.stages import StageChain, stage_bounds
from suite.engine.step import training_step
from suite.engine.training import eval_summary, no_updates, optimizer_steps, train
from suite.engine.transport import Frame, InProcessTransport, Recorder, client_endpoint
from suite.errors import ConfigError
from suite.experiment.config import ExperimentConfig
from suite.experiment.data import Record, load_corpus, tokenize
from suite.experiment.prepared import Prepared, prepare
from suite.experiment.utility import centralised_reference, perplexity
from suite.interfaces.attack import Attack, Cost, Reconstruction, make_attack, timed_reconstruct
from suite.interfaces.defense import Defense, make_defense, public_defense
from suite.interfaces.presets import check_threat
from suite.interfaces.threats import ObservedBatch, ThreatModel, filter_observations, get_threat
from suite.scoring.intervals import record_stats
from suite.scoring.metrics import LeakageMetrics, leakage_metrics


@dataclass
class Capture:
    """Every client's traffic during one capture pass, and the ground truth aligned with it."""

    batches: list[ObservedBatch]  # as the server saw them (decrypted), in order
    frames: list[Frame]  # the bytes on the wire, in order
    true_ids: torch.Tensor  # [N, T] token ids, rows in the order of ``batches``
    mask: torch.Tensor  # [N, T]
    records: list[Record]  # the records behind the rows, same order
    row_client: list[int]  # the client each row belongs to
    # stages > 1: what each pipeline stage saw (its input hidden states, the gradients the next stage sent
    # back), per stage in the order of ``batches``; empty with one server
    stage_batches: dict[int, list[ObservedBatch]] = field(default_factory=dict)

    def of(self, victims: list[int]) -> Capture:
        """Only the victims' traffic and truth: what a threat whose colluder is not a victim observes."""
        keep = set(victims)
        rows = [i for i, c in enumerate(self.row_client) if c in keep]
        ends = {client_endpoint(v) for v in keep}
        return Capture(
            [b for b in self.batches if b.client_id in keep],
            [f for f in self.frames if f.src in ends or f.dst in ends],
            self.true_ids[rows],
            self.mask[rows],
            [self.records[i] for i in rows],
            [self.row_client[i] for i in rows],
            {s: [b for b in bs if b.client_id in keep] for s, bs in self.stage_batches.items()},
        )


@dataclass
class TrainedSplit:
    """A split model trained under some server behaviour, plus its capture and public knowledge."""

    prepared: Prepared
    capture: Capture
    utility: float  # held-out loss of client 0's fine-tuned model after training
    shadow: list[Record]
    base: LoadedModel  # pristine public weights (copies are handed to attacks)
    defense: Defense
    eval_losses: torch.Tensor | None = None  # per held-out sequence, under the deployed defense (for intervals)
    reference: dict[str, float] = field(default_factory=dict)  # utility_/perplexity_centralised
    # per held-out sequence (loss x tokens, tokens) under the same evaluation as ``utility``: its interval
    utility_scores: list[list[float]] | None = None
    # optimiser steps each party took in training ({"server": {...}, "clients": [...]}, plus the reference's)
    optimizer_steps: dict | None = None

    @property
    def perplexity(self) -> float:
        return perplexity(self.utility)


def capture_traffic(prepared: Prepared, batch_size: int, first_step: int) -> Capture:
    """Each client sends its whole shard once more through the protocol (batches in order) while a tap on the
    wire and a tap on the server's inbox record what crosses the split. Every message is the one a training
    step would send (activations, hidden states, both gradients, a deviating server's replies), but no party
    takes an optimiser step (``no_updates``): the capture observes the model the training budget produced and
    adds no training to it. Every client is captured, so which clients are victims is decided per threat
    without retraining."""
    session = prepared.session
    server = session.server
    recorder = Recorder()
    session.transport.add_tap(recorder)
    inbox: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    keep = _inbox_tap(inbox)
    server.inbox_taps.append(keep)
    stages = server.stages if isinstance(server, StageChain) else []
    stage_inbox: list[dict[tuple[int, int], dict[str, torch.Tensor]]] = [{} for _ in stages]
    stage_taps = [_inbox_tap(box) for box in stage_inbox]
    for stage, tap in zip(stages, stage_taps, strict=True):
        stage.inbox_taps.append(tap)
    ids, masks, records, order, row_client = [], [], [], [], []
    step = first_step
    try:
        with no_updates(session):
            for v in range(len(session.clients)):
                client = session.clients[v]
                data = client.batches.data  # the victim's tokenised shard, in order
                for lo in range(0, data["input_ids"].shape[0], batch_size):
                    batch = Batch(*(data[k][lo : lo + batch_size] for k in ("input_ids", "attention_mask", "labels")))
                    training_step([client], server, step, [batch])
                    ids.append(batch.input_ids)
                    masks.append(batch.attention_mask)
                    order.append((v, step))
                    row_client += [v] * batch.input_ids.shape[0]
                    step += 1
                records += prepared.private[v]
    finally:
        server.inbox_taps.remove(keep)
        for stage, tap in zip(stages, stage_taps, strict=True):
            stage.inbox_taps.remove(tap)
        session.transport.remove_tap(recorder)
    batches = _observed(inbox, order)
    views = {i: _observed(box, order) for i, box in enumerate(stage_inbox)}
    return Capture(batches, recorder.frames, torch.cat(ids), torch.cat(masks), records, row_client, views)


def _inbox_tap(inbox: dict[tuple[int, int], dict[str, torch.Tensor]]):
    """A party's memory: every activation (with its mask) and gradient it received, by (client, step)."""
    def keep(msg) -> None:
        entry = inbox.setdefault((msg.client_id, msg.step), {})
        if isinstance(msg, ActivationMsg):
            entry["hidden"], entry["mask"] = msg.hidden, msg.attention_mask
        elif isinstance(msg, GradientMsg):
            entry["gradient"] = msg.grad
    return keep


def _observed(inbox: dict[tuple[int, int], dict[str, torch.Tensor]], order: list[tuple[int, int]]) -> list[ObservedBatch]:
    return [ObservedBatch(c, s, inbox[(c, s)]["hidden"], inbox[(c, s)]["mask"], inbox[(c, s)].get("gradient"))
            for c, s in order]


def stage_view(capture: Capture, threat: ThreatModel, spec: SplitSpec, trunk_blocks: int,
               stages: int) -> tuple[Capture, SplitSpec]:
    """What a stage threat observes, and the split it observes it at. A stage whose first block is d sees the
    hidden states entering block d, as a server at split d does, and the gradient of its own output, sent by
    the stage after it: its view is a server's at ``SplitSpec(d, layers - end)``. Two colluding stages pool
    theirs: the earlier one's inputs and the later one's received gradients (a server spanning both). With
    one stage the view is the server's."""
    if not threat.stages or stages == 1:
        return capture, spec
    bounds = stage_bounds(spec.head_blocks, trunk_blocks, stages)
    first, last = min(threat.stages), max(threat.stages)
    inputs, grads = capture.stage_batches[first], capture.stage_batches[last]
    batches = [ObservedBatch(a.client_id, a.step, a.hidden, a.attention_mask, g.gradient)
               for a, g in zip(inputs, grads, strict=True)]
    layers = spec.head_blocks + trunk_blocks + spec.tail_blocks
    seen = SplitSpec(bounds[first][0], layers - bounds[last][1])
    return dataclasses.replace(capture, batches=batches), seen


def install_policy(server, threat: ThreatModel | None, policy) -> None:
    """A deviating party's policy: on the stage a stage threat names, else on the (whole) server."""
    if threat is not None and threat.stages and isinstance(server, StageChain):
        server.stages[threat.stages[0]].policy = policy
    else:
        server.policy = policy


def train_split(
    cfg: ExperimentConfig,
    spec: SplitSpec,
    base: LoadedModel,
    threat: ThreatModel | None = None,
    attack: Attack | None = None,
    defense: Defense | None = None,
    reference: bool = True,
) -> TrainedSplit:
    """Train ``spec`` on a fresh copy of ``base`` under ``defense`` (with the attack's server policy if it is
    active; ``threat`` is what it may know while training), then capture every client's traffic. Utility is
    measured under the defense; ``reference``: also the centralised LoRA reference (cached per config)."""
    # The run's own model: its modules are copied, but when the server trains only adapters (or nothing)
    # and stays on the base's device, the frozen base weights are shared with ``base`` instead of copied.
    from suite.engine.split import frozen_memo
    from suite.experiment.prepared import devices

    server_device = devices(cfg)[1]
    share = cfg.training.server_finetune != "full" and server_device == next(base.model.parameters()).device
    frozen = base.model.requires_grad_(False) if share else None
    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model, frozen_memo(frozen) if share else None))
    defense = defense if defense is not None else make_defense("none")
    prepared = prepare(cfg, spec, loaded=loaded, transport=defense.wrap_transport(InProcessTransport()),
                       keep_public=getattr(defense, "keeps_public", False))
    shadow = load_corpus(cfg.data.shadow.spec(), avoid=[r for s in prepared.private for r in s])
    _calibrate(defense, prepared, shadow, cfg.data.max_length)
    defense.install(prepared.session)
    if attack is not None and attack.active:
        if threat is None:
            raise ValueError("an active attack needs the threat it runs under")
        public = _observations(threat, spec, base, cfg, shadow, prepared, capture=None, defense=defense,
                               attack=attack)
        install_policy(prepared.session.server, threat, attack.server_policy(public))
    train(prepared.session)  # a deviating server keeps deviating while the traffic is captured
    steps = optimizer_steps(prepared.session)
    # Utility under the defense: the deployed forward pass (noise and every hook that changes what is sent),
    # on the model the training budget produced.
    utility, per_sequence, scores = eval_summary(prepared.session, prepared.eval_data)
    capture = capture_traffic(prepared, cfg.training.batch_size, first_step=len(prepared.session.losses))
    if optimizer_steps(prepared.session) != steps:  # the capture must add no training
        raise RuntimeError(f"the traffic capture changed the optimiser steps: {steps} -> "
                           f"{optimizer_steps(prepared.session)}")
    ref = centralised_reference(cfg, base) if reference else {}
    if "optimizer_steps_centralised" in ref:
        steps["reference"] = ref["optimizer_steps_centralised"]
    return TrainedSplit(prepared, capture, utility, shadow, base, defense, per_sequence,
                        {k: v for k, v in ref.items() if k != "optimizer_steps_centralised"},
                        utility_scores=scores, optimizer_steps=steps)


def _calibrate(defense: Defense, prepared: Prepared, shadow: list[Record], max_length: int) -> None:
    """Let ``defense`` set its public parameters from the public head's outputs on the shadow text."""
    head = prepared.session.clients[0].head
    data = tokenize(shadow, prepared.loaded.tokenizer, max_length)
    device = next(head.parameters()).device
    defense.calibrate(head, data["input_ids"].to(device), data["attention_mask"].to(device))


def rewire(trained: TrainedSplit, defense: Defense) -> TrainedSplit:
    """The same trained split under a ``wire_only`` defense: its channel carries the capture's frames. The
    server's decrypted view, the weights and the utility are those of ``trained`` (such a defense changes
    only the bytes on the wire), so the frames are replayed in order through a fresh channel of
    ``defense`` and the bytes it puts on the wire are kept. Handshake frames that open a channel are left
    out: in a run trained under the defense they crossed the wire during training, before the capture."""
    if not type(defense).wire_only:
        raise ValueError(f"defense {defense.name!r} changes more than the wire; it needs its own training run")
    capture = dataclasses.replace(trained.capture, frames=replay_frames(trained.capture.frames, defense))
    return dataclasses.replace(trained, capture=capture, defense=defense)


def replay_frames(frames: list[Frame], defense: Defense) -> list[Frame]:
    """``frames`` replayed in order through a fresh channel of a ``wire_only`` ``defense``: the bytes it puts
    on the wire for each message (see ``rewire``)."""
    inner = InProcessTransport()
    wire = defense.wrap_transport(inner)
    recorder = Recorder()
    wire.add_tap(recorder)
    out = []
    for frame in frames:
        before = len(recorder.frames)
        wire.send(frame.src, frame.dst, frame.data)
        out.append(recorder.frames[-1])  # the message itself; any frames before it opened the channel
        if len(recorder.frames) - before < 1:
            raise ValueError(f"defense {defense.name!r} sent nothing for a frame")
        if wire.recv(frame.dst, frame.src) != frame.data:
            raise ValueError(f"defense {defense.name!r} did not deliver a replayed frame unchanged")
    return out


def trunk_for(prepared: Prepared, client_id: int) -> torch.nn.Module:
    """A fresh fp32 host copy of the server's trunk with ``client_id``'s adapter set active (per_client; the
    shared set otherwise), without the hooks a defense left on it: the weights, not the server's machinery."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    server = prepared.session.server
    trunk = copy.deepcopy(server.trunk).to("cpu", torch.float32)
    name = server.adapters.get(client_id) if server.adapters else None
    for module in trunk.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._backward_hooks.clear()
        if name is not None and isinstance(module, BaseTunerLayer):
            module.set_adapter(name)
    return trunk.requires_grad_(False).eval()


def _observations(threat, spec, base: LoadedModel, cfg, shadow, prepared: Prepared, capture: Capture | None,
                  defense: Defense | None = None, attack: Attack | None = None, audit=None, **inference):
    """What ``attack`` may see: the threat's grants, narrowed to what the attack declares (``requires | uses``).
    ``inference``: what only an inference capture holds (``kv_cache``, ``trunk_outputs``)."""
    colluder = threat.colluder
    victim = len(prepared.session.clients) - 1  # the canary victim (suite.experiment.canaries)

    def model_of(client_id: int):
        def view():
            c = prepared.session.clients[client_id]
            head, tail = copy.deepcopy((c.head, c.tail))
            head, tail = head.to("cpu", torch.float32), tail.to("cpu", torch.float32)  # in place: ties survive
            return head.eval(), trunk_for(prepared, client_id), tail.eval()  # its own trunk adapters (per_client)
        return view

    def base_model():
        model = copy.deepcopy(base.model).requires_grad_(True)  # a fresh, trainable copy, as loaded
        return model.float() if model.dtype != torch.float32 else model  # attacks compute in fp32 on the host

    def colluder_head_tail():
        c = prepared.session.clients[colluder]
        head, tail = copy.deepcopy((c.head, c.tail))
        return head.to("cpu", torch.float32), tail.to("cpu", torch.float32)  # in place: ties survive

    return filter_observations(
        threat,
        attack.capabilities() if attack is not None else None,
        spec=spec,
        tokenizer=base.tokenizer,
        max_length=cfg.data.max_length,
        batches=tuple(capture.batches) if capture else None,
        frames=tuple(capture.frames) if capture else None,
        base_model=base_model,
        shadow=tuple(r.text for r in shadow),
        colluder_head_tail=colluder_head_tail if colluder is not None else None,
        colluder_records=tuple(r.text for r in prepared.private[colluder]) if colluder is not None else None,
        defense=public_defense(defense) if defense is not None else None,
        # the lengths the server saw (every row max_length under hide_lengths), never the clients' own masks
        lengths=tuple(int(n) for b in capture.batches for n in b.attention_mask.sum(1)) if capture else None,
        server_adapters=lambda: trunk_for(prepared, victim),
        colluder_model=model_of(colluder) if colluder is not None else None,
        released_model=model_of(victim),
        audit=audit,
        **inference,
    )


@dataclass
class CellResult:
    threat: str
    attack: str
    defense: str
    metrics: LeakageMetrics
    utility: float
    cost: Cost
    reconstruction: Reconstruction
    references: list[str]
    defense_report: dict
    records: list[Record]  # the victims' records behind ``references`` (ground truth, for reports)
    scores: dict | None = None  # per-record statistics of every metric (suite.scoring.intervals.record_stats)
    perplexity: float | None = None  # exp(utility)
    utility_centralised: float | None = None  # held-out loss of a centralised LoRA fine-tune on the same data
    perplexity_centralised: float | None = None
    eval_losses: torch.Tensor | None = None  # per held-out sequence (for a utility interval)
    adaptive: bool | None = None  # the attack simulated the defense (``Reconstruction.extra["adaptive"]``)
    optimizer_steps: dict | None = None  # TrainedSplit.optimizer_steps
    stage_block: int | None = None  # a stage threat: the first block whose input it saw (its split, as a server)

    def utility_fields(self) -> dict[str, float | dict | None]:
        """The utility columns of a results row besides ``utility``."""
        return {"perplexity": self.perplexity, "utility_centralised": self.utility_centralised,
                "perplexity_centralised": self.perplexity_centralised, "optimizer_steps": self.optimizer_steps}


def attack_trained(trained: TrainedSplit, threat: ThreatModel, attack: Attack, cfg: ExperimentConfig) -> CellResult:
    """Run ``attack`` on a trained split's capture and score it against the victims' records."""
    prepared = trained.prepared
    if attack.kind == "memorisation":
        raise ValueError(f"{attack.name} reads a trained model, not a capture: run it in a matrix "
                         "(splitleak run; suite.experiment.memorisation.memorisation_fields)")
    check_threat(threat, cfg.training.clients)  # with one client the colluder would be the victim
    victims = [c for c in range(cfg.training.clients) if c != threat.colluder]
    split = prepared.session.split
    cap, spec = stage_view(trained.capture.of(victims), threat, split.spec, len(split.server_trunk.blocks.layers),
                           prepared.session.config.stages)
    obs = _observations(threat, spec, trained.base, cfg, trained.shadow, prepared, cap, trained.defense, attack)
    recon, cost = timed_reconstruct(attack, obs)
    tok = trained.base.tokenizer
    references = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(cap.true_ids, cap.mask,
                                                                                           strict=True)]
    pred, hypotheses = recon.token_ids, list(recon.texts)
    if pred.numel() == 0 and recon.note:  # the attack had nothing to work with (e.g. ciphertext only)
        pred = torch.full_like(cap.true_ids, -1)
        hypotheses = [""] * len(references)
    if pred.shape != cap.true_ids.shape:
        raise ValueError(f"attack {attack.name} returned token ids of shape {tuple(pred.shape)}, "
                         f"expected {tuple(cap.true_ids.shape)}")
    metrics = leakage_metrics(
        references=references,
        hypotheses=hypotheses,
        true_ids=cap.true_ids,
        pred_ids=pred,
        mask=cap.mask,
        pii=[r.pii for r in cap.records],
    )
    scores = record_stats(references=references, hypotheses=hypotheses, true_ids=cap.true_ids, pred_ids=pred,
                          mask=cap.mask, pii=[r.pii for r in cap.records])
    adaptive = recon.extra.get("adaptive") if isinstance(recon.extra, dict) else None
    return CellResult(threat.name, attack.name, trained.defense.name, metrics, trained.utility, cost, recon,
                      references, trained.defense.report(), cap.records, scores, trained.perplexity,
                      trained.reference.get("utility_centralised"), trained.reference.get("perplexity_centralised"),
                      trained.eval_losses, None if adaptive is None else bool(adaptive), trained.optimizer_steps,
                      spec.head_blocks if threat.stages else None)


def run_cell(cfg: ExperimentConfig, spec: SplitSpec, threat_name: str, attack_name: str,
             params: dict | None = None, base: LoadedModel | None = None, defense_name: str = "none",
             defense_params: dict | None = None) -> CellResult:
    """One cell from scratch: refuse it early if the attack needs more than the threat grants."""
    from suite.experiment.prepared import load_for

    threat = get_threat(threat_name)
    check_threat(threat, cfg.training.clients)
    attack = make_attack(attack_name, threat, params)
    if attack.kind == "memorisation":  # refused before any training
        raise ConfigError(f"{attack_name} reads a trained model: run it with splitleak attack (which trains with "
                          "the config's canaries) or in a matrix (splitleak run examples/configs/memorisation.toml)")
    defense = make_defense(defense_name, defense_params)
    base = base if base is not None else load_for(cfg)
    trained = train_split(cfg, spec, base, threat, attack if attack.active else None, defense)
    return attack_trained(trained, threat, attack, cfg)
