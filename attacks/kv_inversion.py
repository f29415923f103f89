"""KV-cache inversion: read the prompt and the answer from the keys and values the server's blocks
cache while it generates, without the wire (a memory dump, a shared KV-cache service).

At the server's block ``L`` the cached key and value of position ``t`` are linear maps of the normalised
input of that block at ``t`` (keys also rotated by the position). The attacker runs the public model on
public shadow text, reads the keys and values its block ``L`` caches, and fits the closed-form ridge map
(``attacks.toolkit.linear.ridge_solve``) from standardised keys+values to the normalised input embedding of the token;
each observed position decodes to the nearest embedding row. ``layer``: the trunk's first block, the middle
one or the last one (all three are captured). For the curious server this reads nothing new: the cache is a function of the
activations it received, which the activation attacks read directly (``tests/test_inference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from attacks.toolkit.decoding import nearest_rows
from attacks.toolkit.linear import ridge_solve
from attacks.toolkit.observe import decode_rows, public_parts, run_head, token_embeddings, tokenize
from suite.engine.split import SplitSpec, position_ids_for, split_model
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

LAYERS = ("first", "middle", "last")


def pick_layer(captured, which: str) -> int:
    """The captured block (global index) that ``which`` names: the captured blocks are the trunk's first, middle
    and last (``suite.experiment.inference_cell.kv_layers``; fewer when the trunk has under three blocks)."""
    layers = sorted(captured)
    return {"first": layers[0], "middle": layers[len(layers) // 2], "last": layers[-1]}[which]


@dataclass(frozen=True)
class KvInversionConfig(AttackConfig):
    layer: str = "first"  # "first": the server's first block; "middle": the middle of its blocks; "last": its last
    ridge_lambda: float = 1e-3

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be 'first', 'middle' or 'last', not {self.layer!r}")
        if self.ridge_lambda < 0:
            raise ValueError("ridge_lambda must be >= 0")


@torch.no_grad()
def public_kv(model: torch.nn.Module, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The keys and values [N, T, 2 * kv_heads * head_dim] that the public model's block ``layer`` caches
    for ``ids`` (the layout of ``suite.experiment.inference_cell``'s capture)."""
    n_layers = model.config.num_hidden_layers
    split = split_model(model, SplitSpec(layer, n_layers - layer - 1))  # the trunk is block ``layer`` alone
    hidden = run_head(split.client_head.eval(), ids, mask)
    cache = DynamicCache(config=model.config)
    split.server_trunk(hidden, mask, position_ids_for(mask), cache=cache)
    entry = cache.layers[layer]
    flat = [t.permute(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1) for t in (entry.keys, entry.values)]
    return torch.cat(flat, -1).float()


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
        layer = pick_layer(rows[0], self.config.layer)
        public = public_parts(obs)
        ids, mask = tokenize(obs.tokenizer, obs.shadow, obs.max_length)
        feats = public_kv(public.model, layer, ids, mask)[mask.bool()]
        table = token_embeddings(public.head)
        target = F.normalize(table[ids[mask.bool()]], dim=-1)
        mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
        x = torch.cat([(feats - mu) / sd, torch.ones(feats.shape[0], 1)], 1).double()
        w = ridge_solve(x.T @ x, x.T @ target.double(), self.config.ridge_lambda)
        # a sliding-window block caches only its window's last positions: they are the row's last ones
        lengths = obs.lengths or tuple(r[layer].shape[0] for r in rows)
        out = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        seen = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            kv = r[layer].float()[-n:]
            x = torch.cat([(kv - mu) / sd, torch.ones(kv.shape[0], 1)], 1)
            out[i, n - kv.shape[0] : n] = nearest_rows(x @ w, table)
            seen[i, :n] = 1
        return Reconstruction(out, decode_rows(obs.tokenizer, out, seen), extra={"layer": layer})
