"""The utility side of the privacy-utility trade-off: held-out loss and perplexity under the deployed
defense, and the reference they are quoted against — a centralised LoRA fine-tune on the same data.

The centralised reference trains the whole model in one place (LoRA with the run's rank, alpha, targets and
learning rate) on the union of the clients' records, seeing the same examples as the split run: ``steps x
clients`` batches of ``batch_size``, i.e. as many as the serial server sees. It runs once per model, data and
training config in a process (cached) and is written beside every row, so a report can say "+12 % perplexity
vs centralised". It is trained as a split with the whole stack on the server (head = embedding only, tail =
final norm + LM head): the split engine's logits and gradients equal the unsplit model's (tested per family).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math

from suite.engine.models import LoadedModel
from suite.engine.split import SplitSpec
from suite.engine.training import FinetuneConfig, TrainConfig, build_session, eval_summary, train
from suite.experiment.config import ExperimentConfig
from suite.experiment.data import load_private, tokenize

_CACHE: dict[str, dict[str, float]] = {}


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf where it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _key(cfg: ExperimentConfig, base: LoadedModel) -> str:
    payload = {"model": cfg.model.name, "revision": getattr(base, "revision", ""), "data": cfg.data.model_dump(),
               "training": cfg.training.model_dump(exclude={"head_blocks", "tail_blocks", "strategy",
                                                            "fedavg_every", "finetune", "server_finetune"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def centralised_reference(cfg: ExperimentConfig, base: LoadedModel) -> dict[str, float]:
    """``{"utility_centralised": held-out loss, "perplexity_centralised": its perplexity}`` of a centralised
    LoRA fine-tune on the same records (see the module docstring); computed once per config and process."""
    key = _key(cfg, base)
    if key not in _CACHE:
        t = cfg.training
        loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
        records, held_out = load_private(cfg.data.private.spec(), cfg.data.held_out)
        max_len = cfg.data.max_length
        ft = FinetuneConfig(client="lora", server="lora", rank=t.lora_rank, alpha=t.lora_alpha, lr=t.lr,
                            targets=t.lora_targets)
        config = TrainConfig(strategy="serial", clients=1, steps=t.steps * t.clients, batch_size=t.batch_size,
                             seed=t.seed, finetune=ft)
        session = build_session(loaded.model, SplitSpec(0, 0), [tokenize(records, loaded.tokenizer, max_len)], config)
        train(session)
        loss, *_ = eval_summary(session, tokenize(held_out, loaded.tokenizer, max_len))
        _CACHE[key] = {"utility_centralised": loss, "perplexity_centralised": perplexity(loss)}
    return dict(_CACHE[key])
