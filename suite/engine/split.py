"""Carve a Hugging Face causal LM into ``client_head`` / ``server_trunk`` / ``client_tail``.

The three parts reuse the model's own modules (embedding, decoder blocks, final norm, LM head), so a split
forward pass runs exactly the arithmetic of the unsplit model. What each part needs beyond its modules — the
4-D attention mask and rotary position embeddings — is recomputed locally from the 2-D padding mask and the
position ids, which carry no parameters.

What crosses the wire from the head to the trunk, and what it leaks beyond the hidden states themselves:

* ``attention_mask`` (2-D, 1 = real token): the padding pattern, i.e. every sequence's exact length.
* ``position_ids``: with right padding they are ``0..T-1`` and add nothing to the mask; with left padding or
  packed sequences they would reveal the same length information again.

The trunk needs both to compute causal attention over real tokens; nothing else (no token ids, no labels)
ever leaves the client. The trunk sends back only hidden states: the client already knows mask and positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from suite.errors import ModelError

__all__ = [
    "FAMILIES",
    "ClientHead",
    "ClientTail",
    "Family",
    "ServerTrunk",
    "SplitModel",
    "SplitSpec",
    "family_of",
    "split_model",
]


@dataclass(frozen=True)
class SplitSpec:
    """``head_blocks`` decoder blocks stay with the embedding on the client (0 = embedding only);
    ``tail_blocks`` blocks stay with the final norm and LM head on the client; the server gets the rest."""

    head_blocks: int = 1
    tail_blocks: int = 1

    def check(self, num_layers: int) -> None:
        if self.head_blocks < 0 or self.tail_blocks < 0:
            raise ModelError(
                f"invalid split head_blocks={self.head_blocks}, tail_blocks={self.tail_blocks}: "
                "block counts must be >= 0"
            )
        if self.head_blocks + self.tail_blocks > num_layers:
            raise ModelError(
                f"invalid split head_blocks={self.head_blocks} + tail_blocks={self.tail_blocks} > "
                f"{num_layers} layers of this model; choose at most {num_layers} blocks in total"
            )


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its pieces. Embedding and LM head come from the model's own
    ``get_input_embeddings`` / ``get_output_embeddings``; the rest are attribute paths on ``model.base_model``."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of decoder blocks, on the inner transformer (``model.base_model``)
    norm: str  # final norm, likewise
    pos_embed: str | None = None  # learned absolute positions (GPT-2)
    dropout: str | None = None  # embedding dropout
    rotary: str | None = None  # rotary embedding module (buffers only)
    lora_targets: tuple[str, ...] = ()  # every linear layer inside a block (LoRA targets = "all")
    lora_attention: tuple[str, ...] = ()  # peft's default targets for the family (LoRA targets = "attention")
    conv1d: bool = False  # GPT-2 stores linear weights transposed (Conv1D): LoRA needs fan_in_fan_out
    rotary_per_layer_type: bool = False  # Gemma 3: local (sliding) and global layers use different rope bases


_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "qwen2", "mistral", "gemma"),
        layers="layers",
        norm="norm",
        rotary="rotary_emb",
        lora_targets=_LLAMA_TARGETS,
        lora_attention=("q_proj", "v_proj"),
    ),
    Family(
        # Gemma 3 (text): sliding-window and global attention layers alternate (5:1), each kind with its own
        # rotary base (10k local, 1M global); q/k RMS norms live inside the attention modules and the
        # sqrt(hidden) embedding scale inside the embedding module, so both travel with their parts; the
        # optional final logit soft-capping is applied by the tail.
        "gemma3",
        ("gemma3_text",),
        layers="layers",
        norm="norm",
        rotary="rotary_emb",
        lora_targets=_LLAMA_TARGETS,
        lora_attention=("q_proj", "v_proj"),
        rotary_per_layer_type=True,
    ),
    Family(
        "gpt2",
        ("gpt2",),
        layers="h",
        norm="ln_f",
        pos_embed="wpe",
        dropout="drop",
        lora_targets=("c_attn", "c_proj", "c_fc"),
        lora_attention=("c_attn",),
        conv1d=True,
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        layers="layers",
        norm="final_layer_norm",
        dropout="emb_dropout",
        rotary="rotary_emb",
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        lora_attention=("query_key_value",),
    ),
)


def family_of(model: PreTrainedModel) -> Family:
    model_type = getattr(model.config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelError(f"cannot split model type '{model_type}': supported families are {known}")


class _Blocks(nn.Module):
    """A run of decoder blocks plus the parameter-free glue they need (masks, rotary embeddings).

    ``first`` is the global index of the first block, so per-layer attention types (full / sliding window)
    follow the original model.
    """

    def __init__(self, layers: list[nn.Module], first: int, config, rotary: nn.Module | None, fam: Family):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.first = first
        self.config = config
        self.fam = fam
        # Rotary embeddings hold only buffers; keep them out of the module tree so that a part's
        # state_dict and parameters are exactly its blocks.
        self._rotary = (rotary,) if rotary is not None else ()

    def _layer_type(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        if getattr(self.config, "model_type", "") == "mistral" and getattr(self.config, "sliding_window", None):
            return "sliding_attention"
        return "full_attention"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """``cache`` (optional, a ``transformers`` ``Cache``): incremental decoding. ``hidden`` then holds only
        the new positions, ``attention_mask`` covers cached + new positions, and the blocks' keys/values for
        the new positions are appended to ``cache`` (layers keep their global index)."""
        if len(self.layers) == 0:
            return hidden
        masks: dict[str, object] = {}
        rope: dict[str, object] = {}
        kwargs: dict[str, object] = {"position_ids": position_ids}
        if cache is not None:
            kwargs["layer_past" if self.fam.name == "gpt_neox" else "cache"] = cache
            kwargs["use_cache"] = True
        if self._rotary and not self.fam.rotary_per_layer_type:
            kwargs["position_embeddings"] = self._rotary[0](hidden, position_ids=position_ids)
        for offset, layer in enumerate(self.layers):
            kind = self._layer_type(self.first + offset)
            if self._rotary and self.fam.rotary_per_layer_type:
                if kind not in rope:
                    rope[kind] = self._rotary[0](hidden, position_ids, kind)
                kwargs["position_embeddings"] = rope[kind]
            if kind not in masks:
                make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                masks[kind] = make(
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    cache=cache,
                    position_ids=position_ids,
                    # the cache's own layer (global index): a part's cache holds none of the blocks before it
                    **({"layer_idx": self.first + offset} if cache is not None else {}),
                )
            out = layer(hidden, attention_mask=masks[kind], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class ClientHead(nn.Module):
    """Embedding (+ learned positions, dropout) and the first ``head_blocks`` blocks: runs on the client."""

    def __init__(self, embed: nn.Module, pos_embed: nn.Module | None, dropout: nn.Module | None, blocks: _Blocks):
        super().__init__()
        self.embed = embed
        self.pos_embed = pos_embed
        self.dropout = dropout
        self.blocks = blocks

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings as the first block sees them (what a DxP defence perturbs)."""
        hidden = self.embed(input_ids)
        if self.pos_embed is not None:
            hidden = hidden + self.pos_embed(position_ids)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """With ``cache``: incremental decoding (``input_ids`` / ``position_ids`` only the new positions,
        ``attention_mask`` over cached + new ones; see ``_Blocks.forward``)."""
        hidden = self.embed_tokens(input_ids, position_ids) if inputs_embeds is None else inputs_embeds
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return self.blocks(hidden, attention_mask, position_ids, cache)


class ServerTrunk(nn.Module):
    """The middle blocks: runs on the server and sees only hidden states, mask and positions."""

    def __init__(self, blocks: _Blocks):
        super().__init__()
        self.blocks = blocks

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """With ``cache``: incremental decoding (see ``_Blocks.forward``); the server's own KV cache."""
        return self.blocks(hidden, attention_mask, position_ids, cache)


class ClientTail(nn.Module):
    """The last ``tail_blocks`` blocks, the final norm and the LM head: runs on the client, computes the loss."""

    def __init__(self, blocks: _Blocks, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        """With ``cache``: incremental decoding of the tail's blocks (see ``_Blocks.forward``)."""
        logits = self.lm_head(self.norm(self.blocks(hidden, attention_mask, position_ids, cache)))
        cap = getattr(self.blocks.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma 2/3: tanh soft-capping of the logits, as the unsplit model does
            logits = torch.tanh(logits / cap) * cap
        return logits


@dataclass
class SplitModel:
    """The three parts of one model. The parts share module objects with the model they were carved from."""

    client_head: ClientHead
    server_trunk: ServerTrunk
    client_tail: ClientTail
    spec: SplitSpec
    family: Family
    config: object

    def client_copy(self, share_frozen: bool = False) -> tuple[ClientHead, ClientTail]:
        """A fresh (head, tail) pair for one more client. Copied together so tied weights stay tied.
        ``share_frozen``: parameters that do not require grad (the frozen base under LoRA) are shared with
        this split's parts instead of copied — the modules and anything trained later are the client's own."""
        return copy.deepcopy((self.client_head, self.client_tail), frozen_memo(self.client_head, self.client_tail)
                             if share_frozen else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the split model run locally (no wire): the reference for equality tests."""
        positions = position_ids_for(attention_mask)
        hidden = self.client_head(input_ids, attention_mask, positions)
        hidden = self.server_trunk(hidden, attention_mask, positions)
        return self.client_tail(hidden, attention_mask, positions)


def frozen_memo(*modules: nn.Module) -> dict[int, nn.Parameter]:
    """A ``copy.deepcopy`` memo that maps every frozen parameter of ``modules`` to itself: the copy gets its
    own modules (and its own trainable parameters) but shares the frozen weights, which nobody writes."""
    return {id(p): p for m in modules for p in m.parameters() if not p.requires_grad}


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 for every row, as the unsplit model uses when none are given (right padding)."""
    batch, length = attention_mask.shape
    return torch.arange(length, device=attention_mask.device).unsqueeze(0).expand(batch, length)


def _get(obj: object, path: str) -> nn.Module:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj  # type: ignore[return-value]


def split_model(model: PreTrainedModel, spec: SplitSpec) -> SplitModel:
    """Carve ``model`` per ``spec``; checks loudly that every parameter lands in exactly one party."""
    fam = family_of(model)
    if getattr(model.config, "use_bidirectional_attention", False):
        raise ModelError("cannot split a model with bidirectional attention (use_bidirectional_attention=True): "
                         "the split protocol trains causal LMs")
    base = model.base_model
    layers = list(_get(base, fam.layers))
    spec.check(len(layers))
    k, m = spec.head_blocks, spec.tail_blocks
    n = len(layers)
    rotary = _get(base, fam.rotary) if fam.rotary else None
    config = model.config

    def blocks(lo: int, hi: int) -> _Blocks:
        return _Blocks(layers[lo:hi], lo, config, rotary, fam)

    head = ClientHead(
        model.get_input_embeddings(),
        _get(base, fam.pos_embed) if fam.pos_embed else None,
        _get(base, fam.dropout) if fam.dropout else None,
        blocks(0, k),
    )
    trunk = ServerTrunk(blocks(k, n - m))
    tail = ClientTail(blocks(n - m, n), _get(base, fam.norm), model.get_output_embeddings())
    _check_partition(model, head, trunk, tail)
    return SplitModel(head, trunk, tail, spec, fam, config)


def _check_partition(model: nn.Module, head: nn.Module, trunk: nn.Module, tail: nn.Module) -> None:
    """Every parameter of ``model`` is in exactly one party; the client's head and tail may share a weight
    only when the model ties it (input embedding = LM head), since one client owns both."""
    owner: dict[int, str] = {}
    for part_name, part in (("client_head", head), ("server_trunk", trunk), ("client_tail", tail)):
        for name, p in part.named_parameters(remove_duplicate=True):
            prev = owner.get(id(p))
            if prev is not None and not {prev, part_name} == {"client_head", "client_tail"}:
                raise ModelError(f"split error: parameter {part_name}.{name} is also in {prev}")
            owner.setdefault(id(p), part_name)
    missing = [n for n, p in model.named_parameters() if id(p) not in owner]
    if missing:
        raise ModelError(f"split error: {len(missing)} parameters belong to no part, e.g. {missing[0]}")
    extra = len(owner) - len({id(p) for p in model.parameters()})
    if extra:
        raise ModelError(f"split error: the parts hold {extra} parameters that the model does not")


def lora_targets(part: nn.Module, fam: Family, which: str = "attention") -> list[str]:
    """Module names to adapt with LoRA inside one part: its blocks' attention projections (peft's default
    targets for the family, as FL-GLM uses) or, with ``which="all"``, every linear layer of its blocks. An
    embedding-only head has none and stays frozen under LoRA, as the input embedding does in ordinary LoRA
    fine-tuning (train it with ``finetune = "full"``)."""
    names = fam.lora_attention if which == "attention" else fam.lora_targets
    return [n for n, _ in part.named_modules() if n.rsplit(".", 1)[-1] in names and ".layers." in f".{n}"]
