"""Membership inference on a model view: was this text in the canary victim's training data?

Every query (members and non-members, shuffled, no labels) is scored four ways; higher means "member":

* ``loss``: minus the mean token loss under the view (Yeom et al.);
* ``zlib``: minus the summed token loss over the zlib-compressed length of the text (Carlini et al. 2021);
* ``min_k_plus_plus``: Min-K%++ (Zhang et al. 2024): the mean, over the ``k`` lowest positions, of the token's
  log-probability standardised by the mean and standard deviation of the log-probability under the view's
  own next-token distribution there;
* ``reference``: the base model's mean token loss minus the view's, i.e. the loss calibrated by the public
  pretrained model as the reference (the reference-model attack of Carlini et al. 2021 / LiRA's offline
  one-reference form); needs the base weights. The base model's scores are the same for every cell of a run
  (the same public model, the same records) and are computed once per process.

``signal`` picks the one the row's columns report; all four are returned for the row's breakdown.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import torch

from attacks.toolkit.memorise import VIEW_CAPABILITIES, ViewConfig, open_view, token_stats
from suite.interfaces.attack import Attack, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations

SIGNALS = ("loss", "zlib", "min_k_plus_plus", "reference")


@dataclass(frozen=True)
class MembershipConfig(ViewConfig):
    signal: str = "reference"  # loss | zlib | min_k_plus_plus | reference
    k: float = 0.2  # Min-K%++: the share of lowest-scoring positions averaged
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, not {self.signal!r}")
        if not 0 < self.k <= 1:
            raise ValueError(f"k must be in (0, 1], got {self.k}")


_REFERENCE: dict[str, list[torch.Tensor]] = {}  # fingerprint of (base weights, tokenizer, texts) -> token log-probs


def _reference_logp(obs: Observations, texts: list[str], batch_size: int) -> list[torch.Tensor]:
    """Each text's token log-probabilities under the public base model (the reference). Every cell of a run asks
    the same base model about the same records, so the result is kept per process, keyed by a hash of the base
    weights, the tokenizer, ``max_length`` and the texts (the last two kept)."""
    model = obs.base_model().float().eval().requires_grad_(False)
    h = hashlib.sha256(f"{type(obs.tokenizer).__name__} {getattr(obs.tokenizer, 'name_or_path', '')} "
                       f"{len(obs.tokenizer)} {obs.max_length}".encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    for t in texts:
        h.update(t.encode() + b"\0")
    key = h.hexdigest()
    if key not in _REFERENCE:
        stats = token_stats(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, obs.tokenizer,
                            texts, obs.max_length, batch_size)
        while len(_REFERENCE) >= 2:
            _REFERENCE.pop(next(iter(_REFERENCE)))
        _REFERENCE[key] = stats.logp
    return _REFERENCE[key]


def _min_k_pp(logp: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, k: float) -> float:
    z = (logp - mu) / sigma
    n = max(1, int(round(k * z.numel())))
    return float(z.sort().values[:n].mean())


@register_attack("membership")
class MembershipAttack(Attack):
    requires_any = VIEW_CAPABILITIES
    uses = frozenset({Capability.BASE_WEIGHTS})
    audits = frozenset({"queries"})
    Config = MembershipConfig
    kind = "memorisation"

    def reconstruct(self, obs: Observations) -> Reconstruction:
        if obs.audit is None or not obs.audit.queries:
            raise ValueError("membership needs records to ask about: the runner's audit set is empty")
        if self.config.signal == "reference" and obs.base_model is None:
            raise ValueError("signal 'reference' needs the public base weights, which this threat does not grant; "
                             "use signal = 'loss', 'zlib' or 'min_k_plus_plus'")
        texts = list(obs.audit.queries)
        view = open_view(obs, self.config.view)
        stats = token_stats(view.logits, obs.tokenizer, texts, obs.max_length, self.config.batch_size)
        keep = [lp.numel() > 0 for lp in stats.logp]
        loss = [float(-lp.mean()) if lp.numel() else 0.0 for lp in stats.logp]
        scores = {
            "loss": [-x for x in loss],
            "zlib": [float(lp.sum()) / len(zlib.compress(t.encode())) for lp, t in zip(stats.logp, texts, strict=True)],
            "min_k_plus_plus": [_min_k_pp(lp, m, s, self.config.k) if lp.numel() else 0.0
                                for lp, m, s in zip(stats.logp, stats.mu, stats.sigma, strict=True)],
        }
        if obs.base_model is not None:
            base = _reference_logp(obs, texts, self.config.batch_size)
            scores["reference"] = [float(-b.mean()) - x if b.numel() else 0.0 for b, x in zip(base, loss, strict=True)]
        if not all(keep):
            raise ValueError(f"{keep.count(False)} queries have no token to score; raise data.max_length")
        return Reconstruction(torch.empty(0, dtype=torch.long), (), extra={
            "view": view.name, "signal": self.config.signal, "scores": scores})
