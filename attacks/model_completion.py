"""Model completion (VFLAIR-LLM's attack, issue 25): the server reads the answer from the hidden states its
trunk returns, with a tail of its own instead of the client's.

The server puts the public model's last blocks, final norm and LM head (the public weights of the client's
tail) after the hidden states it returned for one generation; the next-token argmax at position ``t`` is its
reading of the token at ``t + 1``. Greedy generation picks exactly the client tail's argmax, so where the
client's fine-tuning moved its tail little, the server reads every generated token, including the last one,
whose activation never crosses the wire. The prompt's tokens are only predicted (what the model expects next),
not observed. The first position, which nothing precedes, is the token public text starts with most often.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from attacks._common import decode_rows
from attacks._pairs import _tokenize
from suite.engine.split import position_ids_for, split_model
from suite.interfaces.attack import Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations


@dataclass(frozen=True)
class ModelCompletionConfig(AttackConfig):
    pass


@register_attack("model_completion")
class ModelCompletionAttack(Attack):
    requires = frozenset({Capability.TRUNK_OUTPUTS, Capability.BASE_WEIGHTS})
    uses = frozenset({Capability.SHADOW_DATA})  # the most common first token of public text
    Config = ModelCompletionConfig
    modes = frozenset({"inference"})

    @torch.no_grad()
    def reconstruct(self, obs: Observations) -> Reconstruction:
        outs = obs.trunk_outputs or ()
        if not outs:
            return Reconstruction(torch.empty(0, dtype=torch.long), (), note="no trunk outputs observed")
        model = obs.base_model()
        model.requires_grad_(False)
        tail = split_model(model.eval(), obs.spec).client_tail
        first = 0
        if obs.shadow:
            ids, mask = _tokenize(obs, tuple(obs.shadow))
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
        return Reconstruction(out, decode_rows(obs.tokenizer, out, seen))
