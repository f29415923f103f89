"""What an attacker holds, read as the clients read it: their tokenisation, the observed head outputs, and the
parts of the model it verifies against (the public ones, or a colluder's fine-tuned head and tail).

Freezing rule (one, for every part handed out here): parameters do not require gradients and every module is
in eval mode; an attack that trains something (``calibrate``) works on its own copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from suite.engine.split import ClientHead, ClientTail, ServerTrunk, position_ids_for, split_model
from suite.interfaces.threats import Observations


def tokenize(tokenizer, texts, max_length: int, longest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and padding mask [N, T] as the clients tokenise (``suite.experiment.data.tokenize``): right
    padding to ``max_length``, truncated, so position t means the same in the attacker's shadow pairs and in
    the victims' traffic. ``longest``: pad only to the longest text (scoring likelihoods, not positions)."""
    enc = tokenizer(list(texts), padding=True if longest else "max_length", truncation=True, max_length=max_length,
                    padding_side="right", return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def shadow_batch(obs: Observations) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The public shadow text tokenised as the clients tokenise, or None without it."""
    if not obs.shadow:
        return None
    return tokenize(obs.tokenizer, obs.shadow, obs.max_length)


def stacked(obs: Observations) -> tuple[torch.Tensor, torch.Tensor]:
    """All observed head outputs as one [N, T, H] tensor (right-padded to the longest) and the [N, T] mask."""
    if not obs.batches:
        raise ValueError("no observed activations")
    length = max(b.hidden.shape[1] for b in obs.batches)
    hidden = torch.cat([torch.nn.functional.pad(b.hidden.float(), (0, 0, 0, length - b.hidden.shape[1]))
                        for b in obs.batches])
    mask = torch.cat([torch.nn.functional.pad(b.attention_mask, (0, length - b.attention_mask.shape[1]))
                      for b in obs.batches])
    return hidden, mask


def shared_base(obs: Observations) -> Observations:
    """``obs`` whose ``base_model()`` returns one frozen copy for the whole reconstruction instead of a fresh
    deep copy per call. For attacks whose every use of the base only reads it (split views, the LM prior;
    ``calibrate`` copies the head it tunes)."""
    if obs.base_model is None:
        return obs
    made: list[torch.nn.Module] = []

    def once() -> torch.nn.Module:
        if not made:
            made.append(frozen(obs.base_model()))
        return made[0]

    return dataclasses.replace(obs, base_model=once)


def frozen(module: nn.Module) -> nn.Module:
    """The freezing rule: no parameter requires a gradient, eval mode. Returns ``module`` itself."""
    module.requires_grad_(False)
    return module.eval()


@dataclass
class Parts:
    """The parts an attacker runs: head, trunk and tail (frozen, eval), the public model they were carved from
    (the LM prior's) and where the head and tail come from (``"base"`` or ``"colluder"``)."""

    head: ClientHead
    trunk: ServerTrunk
    tail: ClientTail
    model: nn.Module
    source: str = "base"


def public_parts(obs: Observations) -> Parts:
    """The head, trunk and tail as the public base weights define them (before any fine-tuning)."""
    model = frozen(obs.base_model())
    split = split_model(model, obs.spec)
    return Parts(frozen(split.client_head), frozen(split.server_trunk), frozen(split.client_tail), model)


def public_head(obs: Observations) -> ClientHead:
    return public_parts(obs).head


def colluder_parts(obs: Observations) -> tuple[ClientHead, ClientTail] | None:
    """The colluding client's fine-tuned head and tail (frozen, eval), or None where the threat grants none."""
    if obs.colluder_head_tail is None:
        return None
    head, tail = obs.colluder_head_tail()
    return frozen(head), frozen(tail)


def reference_parts(obs: Observations, use_colluder: bool = True) -> Parts:
    """The parts an attacker verifies against: the colluder's fine-tuned head and tail (closest to the victims')
    when ``use_colluder`` and the threat grants them, else the public ones; the trunk is always public."""
    parts = public_parts(obs)
    colluder = colluder_parts(obs) if use_colluder else None
    if colluder is not None:
        parts = dataclasses.replace(parts, head=colluder[0], tail=colluder[1], source="colluder")
    return parts


def token_embeddings(head: ClientHead) -> torch.Tensor:
    """[V, H] input embedding rows as the first block sees them, without position embeddings."""
    with torch.no_grad():
        return head.embed(torch.arange(head.embed.num_embeddings)).float()


def without_positions(head: ClientHead, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Remove learned absolute position embeddings (GPT-2) from an embedding-space vector."""
    if head.pos_embed is None:
        return hidden
    with torch.no_grad():
        return hidden - head.pos_embed(position_ids_for(mask)).float()


@torch.no_grad()
def run_head(head: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``head``'s outputs [N, T, H] (fp32) on right-padded ``ids`` / ``mask``, ``chunk`` sequences at a time."""
    return torch.cat([head(ids[lo : lo + chunk], mask[lo : lo + chunk], position_ids_for(mask[lo : lo + chunk])).float()
                      for lo in range(0, ids.shape[0], chunk)])


def decode_rows(tokenizer, token_ids: torch.Tensor, mask: torch.Tensor) -> tuple[str, ...]:
    """Each row's real tokens as text."""
    return tuple(tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(token_ids, mask,
                                                                                               strict=True))


def start_token(tokenizer) -> int | None:
    """The token a public LM reads a document start after: the end-of-text separator it was pre-trained with
    (GPT-2, SmolLM), else its beginning-of-sequence token."""
    for tok in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tok is not None:
            return int(tok)
    return None


def known_prefix(tokenizer) -> tuple[int, ...]:
    """The special tokens the clients' tokenisation puts before every text (Gemma's ``<bos>``; none for
    SmolLM2): public, since the tokenizer is, so an attack takes them as they are instead of searching them."""
    runs = [tokenizer(text)["input_ids"] for text in ("Hello world.", "7 zebras, quietly")]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    out = []
    for a, b in zip(*runs, strict=False):
        if a != b or a not in special:
            break
        out.append(int(a))
    return tuple(out)
