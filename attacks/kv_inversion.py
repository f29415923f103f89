"""KV-cache inversion: read the prompt and the answer from the keys and values the server's blocks
cache while it generates, without the wire (a memory dump, a shared KV-cache service).

At the server's block ``L`` the cached key and value of position ``t`` are functions of tokens ``0..t`` alone
(the block's normalised input at ``t``, projected; keys also rotated by the position), so the prefix search
of ``prefix_inversion`` applies unchanged with another reference: ``KvReadout``, the public model's blocks
``0..L`` as a head whose output at each position is what block ``L`` caches there. Each observed row is
searched token by token, every candidate verified by one incremental step of that readout
(``method = "search"``, the default). This is the idea of the collision attack of "Shadow in the Cache" (Luo
et al., NDSS 2026, arXiv 2508.09442: recompute the cache of candidate tokens position by position and keep
the one that matches), with ``prefix_inversion``'s proposer, gradient-ranked widening over the whole
vocabulary, LM prior, beam and early-position step choosing the candidates. ``method = "ridge"`` is the
one-shot baseline: a closed-form ridge map (``attacks.toolkit.linear.ridge_solve``) fitted on the public
model's caches over public shadow text, from standardised keys+values to the token's normalised input
embedding, each position decoded to the nearest embedding row. ``layer``: the trunk's first block, the middle
one or the last one (all three are captured). For the curious server this reads nothing new: the cache is a
function of the activations it received, which the activation attacks read directly (``tests/test_inference.py``).
The memory dump holds no server adapters (the threat grants the cache and public knowledge): the readout is the
public model's, and the search's cosine score and drift calibration absorb the fine-tuning's drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache

from attacks.prefix_inversion import PrefixInversionConfig
from attacks.toolkit.decoding import nearest_rows
from attacks.toolkit.linear import ridge_solve
from attacks.toolkit.observe import (
    decode_rows,
    frozen,
    public_parts,
    run_head,
    shared_base,
    token_embeddings,
    tokenize,
)
from attacks.toolkit.prefix.invert import prefix_invert
from suite.engine.split import ClientHead, SplitSpec, position_ids_for, split_model
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

LAYERS = ("first", "middle", "last")


def pick_layer(captured, which: str) -> int:
    """The captured block (global index) that ``which`` names: the captured blocks are the trunk's first, middle
    and last (``suite.experiment.inference_cell.kv_layers``; fewer when the trunk has under three blocks)."""
    layers = sorted(captured)
    return {"first": layers[0], "middle": layers[len(layers) // 2], "last": layers[-1]}[which]


METHODS = ("search", "ridge")


@dataclass(frozen=True)
class KvInversionConfig(AttackConfig):
    layer: str = "first"  # "first": the server's first block; "middle": the middle of its blocks; "last": its last
    method: str = "search"  # "search": the prefix search on the readout; "ridge": the one-shot linear map
    ridge_lambda: float = 1e-3
    # the search's second pass on a readout calibrated to the drift (``prefix_inversion``'s knob; 0: one pass)
    calibrate_steps: int = 0

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be 'first', 'middle' or 'last', not {self.layer!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be 'search' or 'ridge', not {self.method!r}")
        if self.ridge_lambda < 0 or self.calibrate_steps < 0:
            raise ValueError("ridge_lambda and calibrate_steps must be >= 0")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[N, kv_heads, T, head_dim] -> [N, T, kv_heads * head_dim] (the capture's layout)."""
    return t.permute(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)


class KvReadout(ClientHead):
    """The model's blocks ``0..layer`` as a client head whose output at each position is the key and value
    block ``layer`` caches there, [..., 2 * kv_heads * head_dim] (keys then values, the layout of
    ``suite.experiment.inference_cell``'s capture). It takes a head's arguments, incremental decoding with a
    ``cache`` included, so the prefix search verifies candidates on it as on a head. ``after_head`` carries a
    client head's (released) output, ``head_blocks`` blocks deep, through the blocks after it to the cache."""

    def __init__(self, model: torch.nn.Module, layer: int, head_blocks: int = 0):
        n_layers = model.config.num_hidden_layers
        head = split_model(model, SplitSpec(layer + 1, n_layers - layer - 1)).client_head
        super().__init__(head.embed, head.pos_embed, head.dropout, head.blocks)
        self.layer, self.head_blocks = layer, head_blocks
        blocks = self.blocks
        # not a registered submodule: its layers are the readout's own
        self._after = (type(blocks)(list(blocks.layers)[head_blocks:], head_blocks, blocks.config,
                                    blocks._rotary[0] if blocks._rotary else None, blocks.fam),)

    def _read(self, cache: Cache, new: int) -> torch.Tensor:
        entry = cache.layers[self.layer]
        if entry.keys.shape[2] < new:  # a sliding-window block keeps only its window's last positions
            raise ValueError(f"block {self.layer} caches {entry.keys.shape[2]} positions, fewer than the {new} "
                             "asked for (its sliding window)")
        return torch.cat([_flat(entry.keys[:, :, -new:]), _flat(entry.values[:, :, -new:])], -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        new = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        # without a cache to extend, one that keeps every position (a sliding-window block's mask still comes
        # from the config): a whole sequence longer than the window reads every position's key and value
        own = cache if cache is not None else DynamicCache()
        super().forward(input_ids, attention_mask, position_ids, inputs_embeds, own)
        return self._read(own, new)

    def after_head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s keys and values for a whole sequence whose output after ``head_blocks`` blocks is
        ``hidden`` [N, T, H] (what a client released)."""
        cache = DynamicCache()
        self._after[0](hidden, attention_mask, position_ids_for(attention_mask), cache)
        return self._read(cache, hidden.shape[1])


@register_attack("kv_inversion")
class KvInversionAttack(Attack):
    requires = frozenset({Capability.KV_CACHE, Capability.BASE_WEIGHTS, Capability.SHADOW_DATA})
    Config = KvInversionConfig
    modes = frozenset({"inference"})

    def reconstruct(self, obs: Observations) -> Reconstruction:
        rows = obs.kv_cache or ()
        if not rows or not rows[0]:
            return Reconstruction(torch.empty(0, dtype=torch.long), (),
                                  note="no KV cache to invert (the server holds no blocks at this split)")
        start = time.perf_counter()
        obs = shared_base(obs)
        layer = pick_layer(rows[0], self.config.layer)
        model = public_parts(obs).model
        lengths = obs.lengths or tuple(r[layer].shape[0] for r in rows)
        whole = all(r[layer].shape[0] >= n for r, n in zip(rows, lengths, strict=True))
        readout = frozen(KvReadout(model, layer, obs.spec.head_blocks))
        note = ""
        if self.config.method == "search" and whole:
            out, seen, extra = self._search(obs, readout, rows, layer, lengths)
        else:  # the one-shot map (also where a sliding-window block kept only the rows' last positions)
            out, seen, extra = self._ridge(obs, readout, rows, layer, lengths)
            if self.config.method == "search":
                note = ("the ridge map, not the search: the block's cache holds only part of a row (a sliding window, "
                        "or lengths the defense hid), and the search needs every position")
        extra.update(layer=layer, seconds=time.perf_counter() - start)
        return Reconstruction(out, decode_rows(obs.tokenizer, out, seen), extra=extra, note=note)

    def _search(self, obs: Observations, readout: KvReadout, rows, layer: int, lengths) -> tuple:
        """The prefix search on the cached rows, verified on the public readout of block ``layer``."""
        width = max(lengths)
        target = torch.zeros(len(rows), width, rows[0][layer].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            target[i, :n] = r[layer].float()[:n]
            mask[i, :n] = 1
        opt = replace(PrefixInversionConfig(seed=self.config.seed, calibrate_steps=self.config.calibrate_steps).options(),
                      use_colluder=False)
        ids, extra = prefix_invert(obs, opt, target, mask, head=readout)
        ids = ids.masked_fill(~mask.bool(), obs.tokenizer.pad_token_id or 0)
        return ids, mask, {"method": "search", **extra}

    def _ridge(self, obs: Observations, readout: KvReadout, rows, layer: int, lengths) -> tuple:
        """The one-shot ridge map from standardised keys+values to the token's normalised input embedding."""
        ids, mask = tokenize(obs.tokenizer, obs.shadow, obs.max_length)
        feats = run_head(readout, ids, mask)[mask.bool()]
        table = token_embeddings(readout)
        target = F.normalize(table[ids[mask.bool()]], dim=-1)
        mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
        x = torch.cat([(feats - mu) / sd, torch.ones(feats.shape[0], 1)], 1).double()
        w = ridge_solve(x.T @ x, x.T @ target.double(), self.config.ridge_lambda)
        # a sliding-window block caches only its window's last positions: they are the row's last ones
        out = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        seen = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            kv = r[layer].float()[-n:]
            x = torch.cat([(kv - mu) / sd, torch.ones(kv.shape[0], 1)], 1)
            out[i, n - kv.shape[0] : n] = nearest_rows(x @ w, table)
            seen[i, :n] = 1
        return out, seen, {"method": "ridge"}
