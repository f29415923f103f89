"""The victims' drift from the reference head, estimated from their own traffic (a LoRA adapter fitted so the
reference head's outputs on the recovered text match the observed ones)."""

from __future__ import annotations

import copy
import types
import warnings

import torch
from peft import LoraConfig, inject_adapter_in_model

from attacks.toolkit.prefix.scorer import Scorer
from suite.engine.split import ClientHead, family_of, lora_targets, position_ids_for


def calibrate(head: ClientHead, config, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
              scores: torch.Tensor, scorer: Scorer, steps: int, lr: float = 1e-3, rank: int = 8,
              keep: float = 0.9, fit: torch.Tensor | None = None) -> ClientHead:
    """The victims' head drifted from the reference by fine-tuning: estimate the drift from their own traffic.

    A LoRA adapter (rank ``rank`` on the family's attention projections, the public training recipe's targets)
    is fitted to a copy of ``head`` so that its outputs on the recovered text ``ids`` match the observed
    ``target`` under the search's score; positions whose first-pass score is in the lowest ``1 - keep``
    fraction (the likely wrong tokens) are left out of the fit, and so are positions outside ``fit`` [N, T] (bool;
    all real positions when None). Returns the calibrated head (frozen, eval)."""
    model = copy.deepcopy(head)
    targets = lora_targets(model, family_of(types.SimpleNamespace(config=config)), "attention")
    real = mask.bool() if fit is None else mask.bool() & fit
    if not targets or steps <= 0 or not real.any():
        return head
    with warnings.catch_warnings():  # a colluder's head already carries its own adapter: this one joins it
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets),
                                model, adapter_name="calibration")
    params = [p for n, p in model.named_parameters() if "lora_" in n and ".calibration" in n]  # never a colluder's own
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    bar = torch.quantile(scores[real].float(), 1.0 - keep) if keep < 1 else torch.tensor(-2.0)
    use = real & (scores >= bar)
    pos = position_ids_for(mask)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            out = model(ids, mask, pos)
            loss = (1 - scorer.score_positions(target, out)[use]).mean()
            loss.backward()
            opt.step()
    model.requires_grad_(False)
    return model.eval()

