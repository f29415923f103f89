"""An inversion attack on a capture file (``splitleak attack --capture FILE``): a networked run's real traffic,
or another framework's written in the same format (``suite.engine.capture``).

The attack gets what its threat grants of the capture, exactly as the in-process cell builds it
(``suite.experiment.cell._observations``): the server's view (every activation and the tail's gradient sent to
the server, decoded and checked as the server checks them; a message without a mask is all real positions,
as the server treats it), the frames for an eavesdropper, the public base model of the config, the public
shadow text of the config, and the capture's defense as a fresh instance built from its public parameters.
A threat with a colluder, or an active attack, needs a training run: refused in one line. The capture's
truth records (the capturing client's own batches) are used only to score; without them the
reconstruction is printed unscored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from suite.engine.capture import CaptureError, read_capture
from suite.engine.protocol import TO_SERVER, ActivationMsg, Expect, GradientMsg, decode, peek
from suite.engine.split import SplitSpec
from suite.errors import ConfigError, ProtocolError
from suite.experiment.config import ExperimentConfig
from suite.interfaces.attack import Cost, Reconstruction, make_attack, timed_reconstruct
from suite.interfaces.defense import make_defense, public_defense
from suite.interfaces.threats import ObservedBatch, filter_observations, get_threat
from suite.scoring.intervals import record_stats, summarize
from suite.scoring.metrics import LeakageMetrics, leakage_metrics


@dataclass
class CaptureAttackResult:
    reconstruction: Reconstruction
    cost: Cost
    batches: int
    references: list[str] | None  # decoded truth, None when the capture holds none
    metrics: LeakageMetrics | None
    intervals: dict[str, float | None] | None  # <metric>, <metric>_lo, <metric>_hi (95 % bootstrap over records)
    defense: str = "none"  # the capture header's defense, as the attack simulated it


def server_view(frames, hidden_size: int, max_length: int) -> list[ObservedBatch]:
    """The batches the server saw, in order: each client step's activation (its last, if a step was retried)
    with the gradient the tail sent after it. Every message is decoded and checked; control messages are
    skipped; anything else is a one-line ``CaptureError``."""
    seen: dict[tuple[int, int], dict] = {}
    for i, frame in enumerate(frames):
        if frame.dst != "server":
            continue
        try:
            kind, _ = peek(frame.data)
            if kind not in ("activation", "gradient"):
                continue
            msg = decode(frame.data, Expect(hidden_size=hidden_size, max_length=max_length))
        except ProtocolError as err:
            raise CaptureError(f"capture frame {i} ({frame.src} -> server): {err}") from None
        if msg.direction != TO_SERVER or f"client/{msg.client_id}" != frame.src:
            raise CaptureError(f"capture frame {i}: a message of client {msg.client_id} {msg.direction} sent by "
                               f"{frame.src} to the server")
        key = (msg.client_id, msg.step)
        if isinstance(msg, ActivationMsg):
            mask = msg.attention_mask
            if mask is None:  # lengths hidden: the server treats every position as real
                mask = torch.ones(msg.hidden.shape[:2], dtype=torch.long)
            seen.pop(key, None)
            seen[key] = {"hidden": msg.hidden, "mask": mask}
        elif isinstance(msg, GradientMsg) and key in seen:
            if tuple(msg.grad.shape) != tuple(seen[key]["hidden"].shape):
                raise CaptureError(f"capture frame {i}: gradient of shape {tuple(msg.grad.shape)} for activations "
                                   f"of shape {tuple(seen[key]['hidden'].shape)}")
            seen[key]["gradient"] = msg.grad
    lengths = {v["hidden"].shape[1] for v in seen.values()}
    if len(lengths) > 1:
        raise CaptureError(f"the captured batches have different lengths {sorted(lengths)}: pad every batch to "
                           "max_length (as splitleak does) before writing the capture")
    return [ObservedBatch(c, s, v["hidden"], v["mask"], v.get("gradient")) for (c, s), v in seen.items()]


def attack_capture(cfg: ExperimentConfig, path, threat_name: str, attack_name: str, params: dict | None = None,
                   base=None) -> CaptureAttackResult:
    """Run ``attack_name`` under ``threat_name`` on the capture at ``path`` (module docstring)."""
    from suite.experiment.data import load_corpus, load_private
    from suite.experiment.prepared import load_for

    capture = read_capture(path)
    header = capture.header
    threat = get_threat(threat_name)
    if threat.colluder is not None:
        raise ConfigError(f"threat {threat_name!r} needs a colluding client's weights, which a capture does not "
                          "hold: use curious_server or eavesdropper")
    attack = make_attack(attack_name, threat, params)
    if attack.active:
        raise ConfigError(f"attack {attack_name!r} deviates from the protocol during training: it needs its own "
                          "run, not a capture")
    if header.get("model") not in (None, cfg.model.name):
        raise ConfigError(f"the capture was made with model {header['model']!r}, the config names "
                          f"{cfg.model.name!r}: pass --model {header['model']}")
    described = header.get("defense") or {"name": "none", "params": {}}
    if not isinstance(described, dict) or not isinstance(described.get("params", {}), dict):
        raise CaptureError("capture header 'defense' must be {\"name\": ..., \"params\": {...}}")
    defense = make_defense(str(described.get("name", "none")), described.get("params") or {})
    base = base if base is not None else load_for(cfg)
    layers = getattr(base.model.config, "num_hidden_layers", None)
    if layers is not None and header["head_blocks"] + header["tail_blocks"] >= layers:
        raise CaptureError(f"capture split k={header['head_blocks']} m={header['tail_blocks']} leaves no server block "
                           f"of {cfg.model.name}'s {layers}: was it made with another model?")
    spec = SplitSpec(header["head_blocks"], header["tail_blocks"])
    batches = server_view(capture.frames, base.model.config.hidden_size, header["max_length"])
    if not batches:
        raise CaptureError(f"capture {path} holds no activation sent to the server: nothing to attack")
    length = batches[0].hidden.shape[1]
    if length != header["max_length"]:  # attacks pad their shadow text to max_length: it must be the frames'
        raise CaptureError(f"capture header max_length {header['max_length']} differs from its frames' length "
                           f"{length}: write the length every batch is padded to")
    private, _ = load_private(cfg.data.private.spec(), cfg.data.held_out)
    shadow = load_corpus(cfg.data.shadow.spec(), avoid=private)

    def base_model():
        model = copy.deepcopy(base.model).requires_grad_(True)
        return model.float() if model.dtype != torch.float32 else model

    obs = filter_observations(
        threat, attack.capabilities(), spec=spec, tokenizer=base.tokenizer, max_length=header["max_length"],
        batches=tuple(batches), frames=tuple(capture.frames), base_model=base_model,
        shadow=tuple(r.text for r in shadow), defense=public_defense(defense),
        lengths=tuple(int(n) for b in batches for n in b.attention_mask.sum(1)))
    recon, cost = timed_reconstruct(attack, obs)
    truth = [capture.truth.get((b.client_id, b.step)) for b in batches]
    if any(t is None for t in truth):
        return CaptureAttackResult(recon, cost, len(batches), None, None, None, defense.name)
    true_ids = _padded([t[0] for t in truth], base.tokenizer.pad_token_id or 0)
    mask = _padded([t[1] for t in truth], 0)
    for b, (ids, _) in zip(batches, truth, strict=True):
        if ids.shape != b.hidden.shape[:2]:
            raise CaptureError(f"capture truth of client {b.client_id} step {b.step} is {tuple(ids.shape)}, its "
                               f"activation {tuple(b.hidden.shape[:2])}")
    tok = base.tokenizer
    if int(true_ids.min()) < 0 or int(true_ids.max()) >= len(tok):
        raise CaptureError(f"capture truth holds token ids outside the tokenizer's 0..{len(tok) - 1}: was it made "
                           "with another model?")
    references = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(true_ids, mask, strict=True)]
    pred, hypotheses = recon.token_ids, list(recon.texts)
    if pred.numel() == 0 and recon.note:
        pred, hypotheses = torch.full_like(true_ids, -1), [""] * len(references)
    if pred.shape != true_ids.shape:
        raise ValueError(f"attack {attack_name} returned token ids of shape {tuple(pred.shape)}, expected "
                         f"{tuple(true_ids.shape)}")
    kw = dict(references=references, hypotheses=hypotheses, true_ids=true_ids, pred_ids=pred, mask=mask)
    metrics = leakage_metrics(**kw, pii=None)  # a capture's truth is token ids: no PII fields to score
    stats = record_stats(**kw)
    return CaptureAttackResult(recon, cost, len(batches), references, metrics, summarize([stats]), defense.name)


def _padded(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Batches of (possibly) different lengths stacked into one [N, T] (right-padded)."""
    length = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, length - r.shape[1]), value=value) for r in rows])

