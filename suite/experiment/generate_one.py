"""``splitleak generate``: train one split (the config's [training], under a defense), then answer one prompt
through it, token by token over the wire, and show what the server read of the prompt and of the answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from suite.engine.split import SplitSpec
from suite.experiment.cell import train_split
from suite.experiment.config import ExperimentConfig
from suite.experiment.data import Record
from suite.experiment.inference_cell import InferenceResult, attack_inference, capture_inference
from suite.experiment.prepared import load_for
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import make_defense
from suite.interfaces.presets import check_threat
from suite.interfaces.threats import get_threat


@dataclass
class Generated:
    answer: str
    seconds_per_token: float
    bytes_per_token: float
    result: InferenceResult | None  # the attack on this one generation, when one was asked for


def generate_one(cfg: ExperimentConfig, spec: SplitSpec, prompt: str, threat: str | None = None,
                 attack: str | None = None, attack_params: dict | None = None, defense: str = "none",
                 defense_params: dict | None = None) -> Generated:
    """Answer ``prompt`` through a split trained per ``cfg`` (client 0 asks); with ``attack``, also what that
    attack under ``threat`` reads of the prompt and the answer. Refused early when the attack needs more than
    the threat grants."""
    threat_model = get_threat(threat or "curious_server")
    check_threat(threat_model, cfg.training.clients)
    made = make_attack(attack, threat_model, attack_params) if attack else None
    base = load_for(cfg)
    ids = base.tokenizer(prompt, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenisation; give some text")
    trained = train_split(cfg, spec, base, defense=make_defense(defense, defense_params), reference=False)
    victim = 1 if threat_model.colluder == 0 else 0
    cap = capture_inference(trained, cfg, [(victim, ids.long(), Record(prompt))])
    answer = base.tokenizer.decode(torch.tensor(cap.answers[0]), skip_special_tokens=True)
    result = attack_inference(trained, cap, threat_model, made, cfg) if made is not None else None
    return Generated(answer, cap.seconds_per_token, cap.bytes_per_token, result)
