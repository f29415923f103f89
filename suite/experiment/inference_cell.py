"""Inference cells (``[matrix] mode = ["inference"]``): the trained split serves its victims' prompts,
and the attacks read what the server saw.

Each victim's records are its prompts. The client generates ``[inference] new_tokens`` tokens for each
through the split (``suite.engine.inference``: every message crosses the wire as bytes, each party keeps its
KV cache). A tap on the server's inbox keeps what it received (the prompt's head output, then each generated
token's), the trunk decoder what it returned and its KV cache (at the trunk's first block and a middle one),
a recorder the bytes on the wire. The head is causal, so what the server received for one generation is the
head output of the whole sequence (prompt + every generated token but the last, which is never sent): the
existing inversion attacks read it as one observed row, unchanged.

Scoring splits every row at the prompt's length: ``prompt_<metric>`` and ``response_<metric>`` (with
intervals and advantage over the blind baseline, docs/inference.md), the plain columns over the whole row. The
response scored is the generated tokens whose activations crossed the wire. Utility at inference is the
ROUGE-L of the deployed answer against the answer of the same trained split without the defense's client
hooks (100 when the defense changes nothing the client computes), and the latency and bytes per token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

from suite.engine.decoding import ClientDecoder, TrunkDecoder
from suite.engine.inference import Sampling, generate
from suite.engine.protocol import ActivationMsg
from suite.engine.transport import Frame, Recorder, client_endpoint
from suite.experiment.cell import TrainedSplit, _observations, replay_frames
from suite.experiment.config import ExperimentConfig
from suite.experiment.data import Record
from suite.interfaces.attack import Attack, Cost, Reconstruction, timed_reconstruct
from suite.interfaces.defense import Defense
from suite.interfaces.presets import check_threat
from suite.interfaces.threats import ObservedBatch, ThreatModel
from suite.scoring.intervals import record_stats
from suite.scoring.metrics import LeakageMetrics, leakage_metrics, rouge

PARTS = ("prompt", "response")


@dataclass
class InferenceCapture:
    """Every victim generation's traffic and the ground truth aligned with it (one row per prompt)."""

    batches: list[ObservedBatch]  # what the server received per generation, [1, L, H] (L = prompt + sent tokens)
    frames: list[Frame]  # the bytes on the wire, in order
    true_ids: torch.Tensor  # [N, T] prompt + sent response tokens, right-padded
    mask: torch.Tensor  # [N, T]
    prompt_mask: torch.Tensor  # [N, T] the prompt's positions
    records: list[Record]
    row_client: list[int]
    answers: list[list[int]]  # every generated token, the last (never sent) included
    bare_answers: list[list[int]] | None  # the same split's answers without the defense's client hooks
    kv_cache: list[dict[int, torch.Tensor]]  # per row: {global block: [L, 2 * kv_heads * head_dim]}
    trunk_outputs: list[torch.Tensor]  # per row: [L, H] the hidden states the server returned
    seconds_per_token: float
    bytes_per_token: float

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask * (1 - self.prompt_mask)

    def of(self, victims: list[int]) -> InferenceCapture:
        keep = set(victims)
        rows = [i for i, c in enumerate(self.row_client) if c in keep]
        ends = {client_endpoint(v) for v in keep}
        return dataclasses.replace(
            self, batches=[self.batches[i] for i in rows],
            frames=[f for f in self.frames if f.src in ends or f.dst in ends],
            true_ids=self.true_ids[rows], mask=self.mask[rows], prompt_mask=self.prompt_mask[rows],
            records=[self.records[i] for i in rows], row_client=[self.row_client[i] for i in rows],
            answers=[self.answers[i] for i in rows],
            bare_answers=None if self.bare_answers is None else [self.bare_answers[i] for i in rows],
            kv_cache=[self.kv_cache[i] for i in rows], trunk_outputs=[self.trunk_outputs[i] for i in rows])


def kv_layers(num_layers: int, head_blocks: int, tail_blocks: int) -> tuple[int, ...]:
    """The server's blocks whose KV cache is captured: its first, the middle of its run and its last (global
    indices; fewer when the run is shorter than three blocks)."""
    first, n = head_blocks, num_layers - head_blocks - tail_blocks
    if n <= 0:
        return ()
    return tuple(sorted({first, first + n // 2, first + n - 1}))


def _kv_rows(trunk: TrunkDecoder, client: int, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    out = {}
    for layer in layers:
        keys, values = trunk.kv(client, layer)  # [1, kv_heads, T, head_dim]
        flat = [t[0].permute(1, 0, 2).reshape(t.shape[2], -1) for t in (keys, values)]
        out[layer] = torch.cat(flat, -1).detach().to("cpu", torch.float32)
    return out


@contextlib.contextmanager
def _without_client_hooks(client):
    """The client as trained, without what its defenses change of what it sends (the undefended answer)."""
    names = ("token_hooks", "input_hooks", "activation_hooks")
    saved = {n: getattr(client, n) for n in names}
    for n in names:
        setattr(client, n, [])
    try:
        yield client
    finally:
        for n, hooks in saved.items():
            setattr(client, n, hooks)


def victim_prompts(trained: TrainedSplit, cfg: ExperimentConfig) -> list[tuple[int, torch.Tensor, Record]]:
    """(client, prompt ids [1, P], record) for every client's first ``[inference] prompts`` records (all when
    None), as its shard tokenised them."""
    out = []
    for v, client in enumerate(trained.prepared.session.clients):
        data = client.batches.data
        n = data["input_ids"].shape[0]
        n = n if cfg.inference.prompts is None else min(cfg.inference.prompts, n)
        for i in range(n):
            out.append((v, data["input_ids"][i][data["attention_mask"][i].bool()][None],
                        trained.prepared.private[v][i]))
    return out


def capture_inference(trained: TrainedSplit, cfg: ExperimentConfig,
                      prompts: list[tuple[int, torch.Tensor, Record]] | None = None) -> InferenceCapture:
    """Every client answers its prompts (``victim_prompts`` unless given) through the trained split while the
    server's inbox, its replies, its KV cache and the wire are recorded (nothing is trained: generation
    computes no gradient)."""
    inf = cfg.inference
    prompts = victim_prompts(trained, cfg) if prompts is None else prompts
    session = trained.prepared.session
    server, spec = session.server, session.split.spec
    sampling = Sampling(inf.temperature, inf.top_k, cfg.training.seed)
    layers = kv_layers(session.split.config.num_hidden_layers, spec.head_blocks, spec.tail_blocks)
    trunk = TrunkDecoder(server)
    trunk.record_replies = True
    recorder = Recorder()
    received: list[ActivationMsg] = []
    session.transport.add_tap(recorder)
    server.inbox_taps.append(received.append)
    batches, ids, prompt_lens, records, row_client, answers, kv, outs = [], [], [], [], [], [], [], []
    bare: list[list[int]] = []
    frames: list[Frame] = []
    has_hooks = any(c.token_hooks or c.input_hooks or c.activation_hooks for c in session.clients)
    step, tokens, seconds = 0, 0, 0.0
    try:
        decoders = [ClientDecoder(client) for client in session.clients]
        for v, prompt, record in prompts:
            client, decoder = session.clients[v], decoders[v]
            received.clear()
            trunk.replies.clear()
            start, first = time.perf_counter(), len(recorder.frames)
            answer, step = generate(decoder, trunk, prompt, inf.new_tokens, sampling, step)
            seconds += time.perf_counter() - start
            frames += recorder.frames[first:]  # the victim's traffic (not the undefended rerun's below)
            tokens += answer.shape[1]
            hidden = torch.cat([m.hidden for m in received], 1)
            seq = torch.cat([prompt, answer[:, :-1]], 1).cpu()
            batches.append(ObservedBatch(v, step, hidden, torch.ones(seq.shape, dtype=torch.long)))
            ids.append(seq[0])
            prompt_lens.append(prompt.shape[1])
            records.append(record)
            row_client.append(v)
            answers.append(answer[0].tolist())
            kv.append(_kv_rows(trunk, v, layers))
            outs.append(torch.cat([r[2] for r in trunk.replies], 1)[0].to("cpu", torch.float32))
            if has_hooks:
                with _without_client_hooks(client):
                    plain, step = generate(decoder, trunk, prompt, inf.new_tokens, sampling, step)
                bare.append(plain[0].tolist())
    finally:
        server.inbox_taps.remove(received.append)
        session.transport.remove_tap(recorder)
    length = max(len(x) for x in ids)
    true_ids = torch.stack([torch.nn.functional.pad(x, (0, length - len(x)), value=0) for x in ids])
    lens = torch.tensor([len(x) for x in ids])
    pos = torch.arange(length)[None]
    mask = (pos < lens[:, None]).long()
    prompt_mask = (pos < torch.tensor(prompt_lens)[:, None]).long()
    total = sum(len(f.data) for f in frames)
    return InferenceCapture(batches, frames, true_ids, mask, prompt_mask, records, row_client, answers,
                            bare if has_hooks else None, kv, outs, seconds / max(tokens, 1), total / max(tokens, 1))


def under_wire_defense(cap: InferenceCapture, defense: Defense) -> InferenceCapture:
    """``cap`` as a ``wire_only`` defense (encryption) carries it: its frames replayed through the defense's
    channel (the server's view and every answer are unchanged)."""
    frames = replay_frames(cap.frames, defense)
    total = sum(len(f.data) for f in frames)
    tokens = sum(len(a) for a in cap.answers)
    return dataclasses.replace(cap, frames=frames, bytes_per_token=total / max(tokens, 1))


@dataclass
class InferenceResult:
    threat: str
    attack: str
    defense: str
    metrics: dict[str, LeakageMetrics]  # "all", "prompt", "response"
    scores: dict[str, dict]  # per part: per-record statistics (suite.scoring.intervals.record_stats)
    reconstruction: Reconstruction
    references: dict[str, list[str]]  # per part
    hypotheses: dict[str, list[str]]
    records: list[Record]
    answers: list[str]  # the generated answers (detokenised), every token
    cost: Cost
    capture: InferenceCapture


def _texts(tok, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)]


def attack_inference(trained: TrainedSplit, cap: InferenceCapture, threat: ThreatModel, attack: Attack,
                     cfg: ExperimentConfig) -> InferenceResult:
    """Run ``attack`` on what ``threat`` observes of the victims' generations and score the prompt and the
    response separately."""
    check_threat(threat, cfg.training.clients)
    victims = [c for c in range(cfg.training.clients) if c != threat.colluder]
    cap = cap.of(victims)
    prepared = trained.prepared
    length = int(cap.mask.shape[1])
    icfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": max(length, cfg.data.max_length)})})
    obs = _observations(threat, prepared.session.split.spec, trained.base, icfg, trained.shadow, prepared, cap,
                        trained.defense, attack, kv_cache=tuple(cap.kv_cache),
                        trunk_outputs=tuple(cap.trunk_outputs))
    recon, cost = timed_reconstruct(attack, obs)
    pred = recon.token_ids
    if pred.numel() == 0 and recon.note:  # nothing to work with (ciphertext only): a guess of nothing
        pred = torch.full_like(cap.true_ids, -1)
    if pred.shape != cap.true_ids.shape:
        raise ValueError(f"attack {attack.name} returned token ids of shape {tuple(pred.shape)}, "
                         f"expected {tuple(cap.true_ids.shape)}")
    tok = trained.base.tokenizer
    masks = {"all": cap.mask, "prompt": cap.prompt_mask, "response": cap.response_mask}
    pii = [r.pii for r in cap.records]
    metrics, scores, refs, hyps = {}, {}, {}, {}
    for part, m in masks.items():
        refs[part] = _texts(tok, cap.true_ids, m)
        hyps[part] = _texts(tok, pred.clamp_min(0), m) if pred.min() >= 0 else [""] * len(refs[part])
        metrics[part] = leakage_metrics(references=refs[part], hypotheses=hyps[part], true_ids=cap.true_ids,
                                        pred_ids=pred, mask=m, pii=pii)
        scores[part] = record_stats(references=refs[part], hypotheses=hyps[part], true_ids=cap.true_ids,
                                    pred_ids=pred, mask=m, pii=pii)
    answers = [tok.decode(a, skip_special_tokens=True) for a in cap.answers]
    return InferenceResult(threat.name, attack.name, trained.defense.name, metrics, scores, recon, refs, hyps,
                           cap.records, answers, cost, cap)


def answer_quality(cap: InferenceCapture, tokenizer) -> float:
    """ROUGE-L (0-100) of the deployed answers against the undefended ones (100 when the defense changes
    nothing the client computes)."""
    if cap.bare_answers is None:
        return 100.0
    deployed = [tokenizer.decode(a, skip_special_tokens=True) for a in cap.answers]
    plain = [tokenizer.decode(a, skip_special_tokens=True) for a in cap.bare_answers]
    return rouge(plain, deployed)["rougeL"]
