"""The eavesdropper's attack: parse the captured bytes as the splitleak wire format, then invert everything
that parses.

Without encryption (FL-GLM's public code talks over an insecure channel) every client→server frame parses:
``ActivationMsg`` frames (the head's output) and ``GradientMsg`` frames (the tail's gradient for the trunk's
output, which carries the labels = the text shifted by one). The eavesdropper then holds exactly what a curious
server holds, and uses all of it:

* on the activations, an inner passive attack (by default the closed-form learned inverter, fit on public
  shadow text, defence-aware unless ``adaptive = false``; ``inner``/``inner_params`` choose another);
* on the gradients (``use_gradients``), the gradient inversion of ``attacks/toolkit/gradients.py``;
* per row it keeps the reconstruction whose text best explains the observed gradient (the relative distance
  between the gradient the public trunk and tail would return for that text and the one on the wire), a
  confidence computed without ground truth.

With authenticated encryption no frame parses: the attack reports that and returns nothing; the cell then
scores as a guess of nothing, no better than a blind guess, so leakage is measured (near zero), not assumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from attacks.toolkit.gradients import gradient_residuals, invert_gradients
from attacks.toolkit.observe import decode_rows, reference_parts, stacked
from suite.engine.protocol import TO_SERVER, ActivationMsg, GradientMsg, decode
from suite.engine.transport import SERVER
from suite.errors import ProtocolError
from suite.interfaces.attack import ATTACKS, Attack, AttackConfig, Reconstruction, register_attack
from suite.interfaces.threats import Capability, Observations, ObservedBatch, ThreatModel

# Parameters an inner attack gets unless ``inner_params`` says otherwise: the learned inverter runs in its
# closed-form mode, the strongest cheap attack an eavesdropper with public weights and text can mount.
_INNER_DEFAULTS: dict[str, dict] = {"learned_inversion": {"mode": "linear"}}


@dataclass(frozen=True)
class WireInversionConfig(AttackConfig):
    # The passive attack run on the parsed activations and its parameters (over ``_INNER_DEFAULTS``).
    # Nearest-embedding alone reads nothing back beyond k = 0 and would understate the leak.
    inner: str = "learned_inversion"
    inner_params: dict = field(default_factory=dict)
    adaptive: bool = True  # handed to the inner attack when it has that option (defence-aware, attacks/toolkit/simulate.py)
    use_gradients: bool = True  # also invert the plaintext gradients and keep, per row, the better-explained text
    solve_steps: int = 8  # gradient inversion: Richardson steps (see gradient_inversion)
    first_token_candidates: int = 64  # gradient inversion: candidates for the token at position 0

    def __post_init__(self) -> None:
        if self.inner == "wire_inversion":
            raise ValueError("inner must be another attack")
        if not isinstance(self.inner_params, dict):
            raise ValueError("inner_params must be a table of the inner attack's parameters")
        if self.inner not in ATTACKS.names():
            raise ValueError(f"unknown inner attack {self.inner!r}; choose one of {', '.join(ATTACKS.names())}")
        try:
            self.inner_config()
        except TypeError as err:
            raise ValueError(f"inner_params for {self.inner!r}: {err}") from None

    def inner_config(self) -> AttackConfig:
        params = {**_INNER_DEFAULTS.get(self.inner, {}), **self.inner_params}
        cls = ATTACKS.get(self.inner)
        if "adaptive" in {f.name for f in dataclasses.fields(cls.Config)}:
            params = {"adaptive": self.adaptive, **params}
        return cls.Config(**{"seed": self.seed, **params})


@register_attack("wire_inversion")
class WireInversionAttack(Attack):
    requires = frozenset({Capability.WIRE, Capability.BASE_WEIGHTS})
    # Whatever its inner attacks use when granted (public text, a colluding peer's weights and records).
    uses = frozenset({Capability.SHADOW_DATA, Capability.COLLUDER_WEIGHTS, Capability.COLLUDER_DATA})
    Config = WireInversionConfig

    def reconstruct(self, obs: Observations) -> Reconstruction:
        cfg: WireInversionConfig = self.config
        acts: dict[tuple[int, int], ObservedBatch] = {}
        grads: dict[tuple[int, int], torch.Tensor] = {}
        failed = 0
        open_rows: dict[int, tuple[int, int]] = {}  # client -> its sequence being generated (split inference)
        for frame in obs.frames or ():
            if frame.dst != SERVER:
                continue
            try:
                msg = decode(frame.data)
            except ProtocolError:
                failed += 1
                continue
            if msg.direction != TO_SERVER:
                continue
            if isinstance(msg, ActivationMsg):
                # lengths hidden (no mask crossed): every position counts as real, as the server treats it;
                # skipping such frames would report a plaintext wire as "nothing to invert"
                mask = msg.attention_mask
                if mask is None:
                    mask = torch.ones(msg.hidden.shape[:2], dtype=torch.long)
                row = open_rows.get(msg.client_id)
                if msg.position_ids is None and msg.attention_mask is not None and row is not None:
                    # A generated token's head output (a mask, no positions: it continues the client's sequence,
                    # suite.engine.decoding): appended to that sequence's row, as the server's cache appends it.
                    b = acts[row]
                    acts[row] = ObservedBatch(b.client_id, b.step, torch.cat([b.hidden, msg.hidden], 1),
                                              torch.cat([b.attention_mask, mask], 1))
                else:
                    acts[(msg.client_id, msg.step)] = ObservedBatch(msg.client_id, msg.step, msg.hidden, mask)
                    open_rows[msg.client_id] = (msg.client_id, msg.step)
            elif isinstance(msg, GradientMsg):
                grads[(msg.client_id, msg.step)] = msg.grad
        parsed = tuple(acts.values())  # in wire order
        if not parsed:
            note = (f"nothing to invert: 0 of {failed} client->server frames parse (ciphertext); the reconstruction "
                    "is empty, i.e. no better than a blind guess")
            return Reconstruction(torch.empty(0, 0, dtype=torch.long), (), note=note,
                                  extra={"adaptive": bool(cfg.adaptive), "parsed_activations": 0,
                                         "parsed_gradients": 0, "unparsed_frames": failed})
        # What parses off the wire is activations: hand them to the inner attack as such.
        inner_cls = ATTACKS.get(cfg.inner)
        grants = (obs.threat.grants | {Capability.ACTIVATIONS}) - {Capability.WIRE}
        view = ThreatModel(f"{obs.threat.name}+parsed", "activations parsed off a plaintext wire", frozenset(grants))
        missing = view.missing(inner_cls.requires)
        if missing:
            raise ValueError(f"inner attack {cfg.inner!r} needs {sorted(m.value for m in missing)}")
        inner_obs = dataclasses.replace(obs, threat=view, batches=parsed, frames=None)
        result = inner_cls(cfg.inner_config()).reconstruct(inner_obs)
        extra = {**result.extra, "adaptive": bool(result.extra.get("adaptive", cfg.adaptive)),
                 "parsed_activations": len(parsed), "parsed_gradients": len(grads), "unparsed_frames": failed}
        note = f"{len(parsed)} plaintext activation and {len(grads)} gradient frames parsed; {failed} did not parse"
        with_grads = tuple(dataclasses.replace(b, gradient=grads.get((b.client_id, b.step))) for b in parsed)
        if cfg.use_gradients and with_grads and all(b.gradient is not None for b in with_grads):
            gview = ThreatModel(f"{obs.threat.name}+parsed", "activations and gradients parsed off a plaintext wire",
                                frozenset(grants | {Capability.GRADIENTS}))
            gobs = dataclasses.replace(obs, threat=gview, batches=with_grads, frames=None)
            g_ids, g_mask, g_texts = invert_gradients(gobs, with_grads, cfg.solve_steps, cfg.first_token_candidates,
                                                      use_colluder=True)
            a_ids = result.token_ids
            if a_ids.shape != g_ids.shape:
                a_ids = torch.nn.functional.pad(a_ids, (0, g_ids.shape[1] - a_ids.shape[1]))
            # Where the two disagree, each position is verified against both things on the wire: the head output
            # (public head on the candidate text, causal: position t depends on tokens <= t), trusted only when the
            # activations carry signal at all (the activation attack's text matches them, mean cosine >= 0.5;
            # under DP noise they do not), and with a clear margin; otherwise the gradient (the label at t drives
            # the gradient at t - 1). Position 0 is never a label: it follows the source the row mostly took.
            res = gradient_residuals(gobs, with_grads, [a_ids, g_ids], use_colluder=True)
            cos_a, cos_g = _activation_match(gobs, with_grads, [a_ids, g_ids])
            grad_says = torch.zeros_like(g_ids, dtype=torch.bool)
            grad_says[:, 1:] = res[1, :, :-1] < res[0, :, :-1]
            informative = float(cos_a[g_mask.bool()].mean()) >= 0.5
            clear = (cos_g - cos_a).abs() > 0.02
            pick = torch.where(clear, cos_g > cos_a, grad_says) if informative else grad_says
            pick = pick & (g_ids != a_ids)
            pick[:, 0] = False
            extra.update(activation_match=float(cos_a[g_mask.bool()].mean()), activations_informative=informative)
            real = g_mask.bool()
            differ = (g_ids != a_ids) & real
            differ[:, 0] = False
            mostly = pick.sum(1) * 2 > differ.sum(1)
            pick[:, 0] = mostly & (differ.sum(1) > 0) & (g_ids[:, 0] != a_ids[:, 0])
            ids = torch.where(pick, g_ids, a_ids).masked_fill(~real, 0)
            texts = decode_rows(obs.tokenizer, ids, g_mask)
            extra.update(tokens_from_gradients=int((pick & real).sum()), tokens=int(real.sum()),
                         tokens_differing=int(differ.sum()))
            note += f"; {int((pick & real).sum())} of {int(real.sum())} tokens taken from the gradients (better explained)"
            return Reconstruction(ids, texts, note=note, extra=extra)
        return Reconstruction(result.token_ids, result.texts, note=note, extra=extra)


def _activation_match(obs: Observations, batches: tuple[ObservedBatch, ...],
                      candidates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per candidate text [N, T]: the cosine, per position, between the public head's output on that text and
    the head output on the wire, each standardised per hidden dimension by its own statistics (so the few
    massive dimensions of pretrained LMs, and a defence's rescaling, do not decide)."""
    from suite.engine.split import position_ids_for

    head = reference_parts(obs).head
    hidden, mask = stacked(dataclasses.replace(obs, batches=batches))
    real = mask.bool()

    def standardised(x: torch.Tensor) -> torch.Tensor:
        flat = x[real]
        return (x - flat.mean(0)) / flat.std(0).clamp_min(1e-6)

    target = standardised(hidden)
    out = []
    for ids in candidates:
        with torch.no_grad():
            h = torch.cat([head(ids[lo : lo + 32, : mask.shape[1]], mask[lo : lo + 32],
                                position_ids_for(mask[lo : lo + 32])).float() for lo in range(0, ids.shape[0], 32)])
        out.append(torch.nn.functional.cosine_similarity(standardised(h), target, dim=-1))
    return out
