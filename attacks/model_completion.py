"""Model completion (VFLAIR-LLM's attack): the server reads the answer from the hidden states its
trunk returns, with a tail of its own instead of the client's.

``tail = "trained"`` (default): the server turns its trunk into a working model. It puts the public head
before its trunk (with its own trained adapters where the threat grants them, else the public trunk) and a
copy of the public tail after it, and trains that tail on its **public shadow text only** (never a victim's
record) with the language-model loss: a few Adam steps (``steps``) on a small LoRA (rank ``rank`` on every
linear layer of the tail's blocks) plus the final norm, or on every tail parameter (``finetune = "full"``).
``parts = "head+tail"`` trains a LoRA on the head's blocks too (VFLAIR's full completion); the default trains
the tail alone, because at inference the trunk receives the *client's* head outputs, not the server's, and a
tail fitted to a head the victims do not run reads them less well. The trunk itself stays as the server has it.
``tail = "public"``: the public tail as it is (no training).

Reading: the next-token argmax at position ``t`` is the server's reading of the token at ``t + 1``. Greedy
generation picks exactly the client tail's argmax, so where the server's tail agrees with the client's, it
reads every generated token, including the last one, whose activation never crosses the wire. The prompt's
tokens are only predicted (what the model expects next), not observed. The first position, which nothing
precedes, is the token public text starts with most often.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attacks.toolkit.observe import decode_rows, run_head, tokenize
from suite.engine.split import family_of, lora_targets, position_ids_for, split_model
from suite.errors import ConfigError
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

_TAILS = ("trained", "public")
_PARTS = ("tail", "head+tail")
_FINETUNE = ("lora", "full")


@dataclass(frozen=True)
class ModelCompletionConfig(AttackConfig):
    tail: str = "trained"  # trained (on public shadow text) | public (the public tail as it is)
    parts: str = "tail"  # which of the server's own parts train: tail | head+tail (the trunk never does)
    finetune: str = "lora"  # lora (rank ``rank`` on the blocks' linear layers, plus the final norm) | full
    steps: int = 60
    lr: float = 2e-3
    rank: int = 8
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name, allowed in (("tail", _TAILS), ("parts", _PARTS), ("finetune", _FINETUNE)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model_completion {name} = {getattr(self, name)!r}: choose one of "
                                  f"{', '.join(allowed)}")
        if self.steps < 0 or self.rank < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"model_completion needs steps >= 0, rank >= 1, batch_size >= 1 and lr > 0 "
                              f"(got steps={self.steps}, rank={self.rank}, batch_size={self.batch_size}, "
                              f"lr={self.lr})")


def _trainable(part: torch.nn.Module, fam, cfg: ModelCompletionConfig, name: str) -> list[torch.nn.Parameter]:
    """Make ``part``'s own copy trainable as configured; returns the parameters to fit."""
    part.requires_grad_(False)
    if cfg.finetune == "full":
        return [p.requires_grad_(True) for p in part.parameters()]
    targets = lora_targets(part, fam, "all")
    params = []
    if targets:
        from peft import LoraConfig, inject_adapter_in_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0,
                                               target_modules=targets, fan_in_fan_out=fam.conv1d),
                                    part, adapter_name=name)
        params = [p for n, p in part.named_parameters() if "lora_" in n and f".{name}" in n]
    norm = getattr(part, "norm", None)
    if norm is not None:
        params += list(norm.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def train_tail(obs: Observations, cfg: ModelCompletionConfig):
    """The server's own tail (and head, with ``parts = "head+tail"``) trained on public shadow text through
    its trunk; returns (tail, diagnostics)."""
    if not obs.shadow:
        raise ConfigError("model_completion tail = 'trained' needs public shadow text (shadow_data); "
                          "set [data] shadow or use tail = 'public'")
    torch.manual_seed(cfg.seed)
    model = obs.base_model()
    fam = family_of(model)
    split = split_model(model.eval(), obs.spec)
    head, tail = split.client_head, split.client_tail
    trunk = obs.server_adapters() if obs.server_adapters is not None else split.server_trunk
    trunk.requires_grad_(False).eval()
    params = _trainable(tail, fam, cfg, "completion_tail")
    train_head = cfg.parts == "head+tail"
    if train_head:
        params += _trainable(head, fam, cfg, "completion_head")
    else:
        head.requires_grad_(False)
    ids, mask = tokenize(obs.tokenizer, obs.shadow, obs.max_length)
    pos = position_ids_for(mask)
    fixed = None
    if not train_head:  # the trunk's outputs on the shadow text do not change: compute them once
        with torch.no_grad():
            feats = run_head(head.eval(), ids, mask)
            fixed = torch.cat([trunk(feats[lo:lo + 64], mask[lo:lo + 64], pos[lo:lo + 64]).float()
                               for lo in range(0, ids.shape[0], 64)])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    tail.train()
    head.train(train_head)
    losses = []
    with torch.enable_grad():
        for _ in range(cfg.steps if params else 0):
            rows = torch.randperm(ids.shape[0], generator=gen)[: cfg.batch_size]
            m, p = mask[rows], pos[rows]
            hidden = fixed[rows] if fixed is not None else trunk(head(ids[rows], m, p), m, p)
            logits = tail(hidden, m, p)[:, :-1]
            target = ids[rows, 1:].masked_fill(m[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    tail.requires_grad_(False)
    info = {"tail": "trained", "parts": cfg.parts, "steps": len(losses),
            "trunk": "server adapters" if obs.server_adapters is not None else "public",
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    return tail.eval(), info


@register_attack("model_completion")
class ModelCompletionAttack(Attack):
    requires = frozenset({Capability.TRUNK_OUTPUTS, Capability.BASE_WEIGHTS})
    # public text: the tail's training (tail = "trained") and the most common first token; the server's own
    # trunk adapters where granted
    uses = frozenset({Capability.SHADOW_DATA, Capability.SERVER_ADAPTERS})
    Config = ModelCompletionConfig
    modes = frozenset({"inference"})

    def reconstruct(self, obs: Observations) -> Reconstruction:
        outs = obs.trunk_outputs or ()
        if not outs:
            return Reconstruction(torch.empty(0, dtype=torch.long), (), note="no trunk outputs observed")
        cfg: ModelCompletionConfig = self.config
        if cfg.tail == "trained":
            tail, info = train_tail(obs, cfg)
        else:
            model = obs.base_model()
            model.requires_grad_(False)
            tail, info = split_model(model.eval(), obs.spec).client_tail, {"tail": "public"}
        with torch.no_grad():
            first = 0
            if obs.shadow:
                ids, mask = tokenize(obs.tokenizer, obs.shadow, obs.max_length)
                first = Counter(ids[mask[:, 0].bool(), 0].tolist()).most_common(1)[0][0]
            lengths = obs.lengths or tuple(o.shape[0] for o in outs)
            out = torch.zeros(len(outs), max(lengths), dtype=torch.long)
            seen = torch.zeros_like(out)
            for i, (hidden, n) in enumerate(zip(outs, lengths, strict=True)):
                m = torch.ones(1, hidden.shape[0], dtype=torch.long)
                logits = tail(hidden[None].float(), m, position_ids_for(m))[0]
                out[i, 0] = first
                out[i, 1:n] = logits[: n - 1].argmax(-1)
                seen[i, :n] = 1
        return Reconstruction(out, decode_rows(obs.tokenizer, out, seen), extra=info)
