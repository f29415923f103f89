"""The utility side of the privacy-utility trade-off: held-out loss and perplexity under the deployed
defense, and the reference they are quoted against — a centralised LoRA fine-tune on the same data.

The centralised reference is a plain transformers + peft training loop that imports nothing of the split
engine, so it cannot share a bug with it. It counts the same updates as the split, in the same order:

* LoRA (peft, the run's rank, alpha and learning rate, no dropout) on exactly the modules the split trains:
  the family's attention projections (peft's default targets) or every linear layer (``lora_targets =
  "all"``) of every decoder block; each A matrix drawn Kaiming-uniform (a = √5, as peft draws it) from a
  generator seeded by the run's seed and the module's place in the model (``_lora_seed``: the same
  derivation as the split engine's ``lora_init_seed``, written out again here), B zero;
* AdamW (no weight decay) over all those matrices, one step per batch;
* the batches the serial server sees, in its order: for each step, client 0's batch, then client 1's, ...,
  each client's batches drawn as the split draws them (a fresh permutation of its own shard, seeded
  ``seed * 1000 + client``, whenever fewer than ``batch_size`` indices are left): ``steps x clients``
  optimiser steps in all;
* held-out loss as the split measures it: mean next-token cross-entropy over every real target token.

With one client, the split (any depth, any strategy) and the reference then hold the same trainable values
after every step, to float rounding (``tests/test_equivalence.py``). With several clients the reference is
one model trained on every client's batches in the serial order, while each split client keeps its own
head and tail: the gap is the price of the split's per-client parts, not of different budgets. It runs once
per model, data and training config in a process (cached) and is written beside every row.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from suite.engine.models import LoadedModel
from suite.experiment.config import ExperimentConfig
from suite.experiment.data import load_private, shard, tokenize

_CACHE: dict[str, dict[str, float]] = {}
_BLOCK = re.compile(r"\.(?:layers|h)\.(\d+)\.(.+)$")  # a module inside decoder block N, and its path there


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf where it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _key(cfg: ExperimentConfig, base: LoadedModel) -> str:
    payload = {"model": cfg.model.name, "revision": getattr(base, "revision", ""), "data": cfg.data.model_dump(),
               "training": cfg.training.model_dump(exclude={"head_blocks", "tail_blocks", "strategy",
                                                            "fedavg_every", "finetune", "server_finetune",
                                                            "stages", "full_lr"})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _lora_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"splitleak lora {seed} {key}".encode()).digest()[:8], "little") >> 1


def lora_modules(model: nn.Module, which: str = "attention") -> dict[str, str]:
    """``{full module name: "<block index>.<path in the block>"}`` of the modules LoRA adapts: the family's
    attention projections (peft's default targets for the model type) or every linear layer of every block."""
    attention = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type, [])
    out = {}
    for name, module in model.named_modules():
        found = _BLOCK.search(name)
        if found is None:
            continue
        if (module.__class__ in (nn.Linear, Conv1D) if which == "all"
                else name.rsplit(".", 1)[-1] in attention):
            out[name] = f"{found[1]}.{found[2]}"
    return out


def add_lora(model: nn.Module, rank: int, alpha: int, which: str, seed: int) -> list[nn.Parameter]:
    """peft LoRA on ``lora_modules(model, which)``, each A matrix from its own seed; returns the LoRA
    parameters (the base is frozen)."""
    modules = lora_modules(model, which)
    model.requires_grad_(False)
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in modules)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(modules),
                                       fan_in_fan_out=conv1d), model)
    for name, key in modules.items():
        weight = model.get_submodule(name).lora_A["default"].weight
        with torch.no_grad():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5),
                                     generator=torch.Generator().manual_seed(_lora_seed(seed, key)))
    return [p for n, p in model.named_parameters() if "lora_" in n]


class _Order:
    """One client's batch order, as the split draws it: a fresh seeded permutation whenever fewer than
    ``batch_size`` indices are left."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, min(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.left: list[int] = []

    def next(self) -> list[int]:
        if len(self.left) < self.batch_size:
            self.left += torch.randperm(self.size, generator=self.generator).tolist()
        idx, self.left = self.left[: self.batch_size], self.left[self.batch_size :]
        return idx


def _token_loss(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over every real target token of ``data``."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for lo in range(0, data["input_ids"].shape[0], batch_size):
            ids, mask, labels = (data[k][lo : lo + batch_size].to(device)
                                 for k in ("input_ids", "attention_mask", "labels"))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            loss = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
            valid = targets != -100
            total += float((loss * valid).sum())
            count += int(valid.sum())
    return total / max(count, 1)


def train_reference(model: nn.Module, shards: list[dict[str, torch.Tensor]], *, steps: int, batch_size: int,
                    lr: float, rank: int, alpha: int, targets: str, seed: int) -> tuple[nn.Module, int]:
    """``model`` (changed in place) LoRA-trained in the serial order over ``shards``; returns it and the
    number of optimiser steps taken."""
    params = add_lora(model, rank, alpha, targets, seed)
    model.train()  # as the split trains (dropout is 0 in the families it splits)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
    orders = [_Order(int(s["input_ids"].shape[0]), batch_size, seed * 1000 + c) for c, s in enumerate(shards)]
    taken = 0
    device = next(model.parameters()).device
    for _ in range(steps):
        for data, order in zip(shards, orders, strict=True):
            idx = order.next()
            ids, mask, labels = (data[k][idx].to(device) for k in ("input_ids", "attention_mask", "labels"))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                taken += 1
    return model, taken


def centralised_reference(cfg: ExperimentConfig, base: LoadedModel) -> dict[str, float]:
    """``{"utility_centralised": held-out loss, "perplexity_centralised": its perplexity,
    "optimizer_steps_centralised": n}`` of the centralised LoRA fine-tune on the same records (see the module
    docstring); computed once per config and process."""
    key = _key(cfg, base)
    if key not in _CACHE:
        t = cfg.training
        records, held_out = load_private(cfg.data.private.spec(), cfg.data.held_out)
        max_len = cfg.data.max_length
        shards = [tokenize(s, base.tokenizer, max_len) for s in shard(records, t.clients)]
        model, taken = train_reference(copy.deepcopy(base.model), shards, steps=t.steps, batch_size=t.batch_size,
                                       lr=t.lr, rank=t.lora_rank, alpha=t.lora_alpha, targets=t.lora_targets,
                                       seed=t.seed)
        loss = _token_loss(model, tokenize(held_out, base.tokenizer, max_len))
        _CACHE[key] = {"utility_centralised": loss, "perplexity_centralised": perplexity(loss),
                       "optimizer_steps_centralised": taken}
    return dict(_CACHE[key])
