"""Pipeline stages: the server's blocks split into S consecutive stage parties (``[training] stages = S``).

Decentralised training (Lu et al. 2023; Petals, SWARM) cuts the trunk into stages run by parties nobody
vouches for. Each stage is a ``Server`` over its own run of blocks, with its own optimiser(s), policy and
inbox; messages between stages cross the transport as bytes (``stage/i`` -> ``stage/i+1`` activations with
the padding mask, ``stage/i+1`` -> ``stage/i`` gradients), like every other message.

``StageChain`` is the S stages seen from the clients: it is what ``suite.engine.step`` calls as "the
server". Its ``forward`` runs the stages in order, its ``backward`` in reverse; the first stage takes the
heads' activations and answers with the heads' gradients, the last one answers the tails and takes their
gradients, both as ``SERVER``, so a client (and a defence on the client <-> server link) cannot tell S = 1
from S > 1. S = 1 is a plain ``Server`` (nothing here runs). Across processes each stage is one ``splitleak
serve --stage i`` (``suite.net.stages``), over the same ``Server`` and the same messages.

What each stage sees is its own inbox (``stage_inbox_taps``): the hidden states entering its first block and
the gradients the next stage (or the tails) sends back. The chain's own ``inbox_taps`` see what a server
holding the whole trunk would: the heads' activations (at stage 0) and the tails' gradients (at stage S-1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from suite.engine.parties import Server, UpdateRefused
from suite.engine.protocol import ActivationMsg, Expect, GradientMsg
from suite.engine.split import ServerTrunk, _Blocks
from suite.errors import ConfigError

# Why integrity_audit refuses S > 1: its verifier is a client, which sees only the chain's two ends (what it
# sent stage 0, what stage S-1 sent back) and one commitment per reply; checking stage i needs stage i's input
# and output, which only the stages hold. The per-stage check is transition_audit's (a server-side verifier).
INTEGRITY_AUDIT_NEEDS_ONE_SERVER = (
    "the integrity_audit defense audits one server (training.stages = 1): its verifier, a client, sees only the "
    "pipeline's two ends, not each stage's input and output; with stages > 1 use transition_audit, which audits "
    "every stage")


class NoOutputCommitments:
    """For a stage or a chain of them (S > 1): output commitments (``commit_state``, what ``integrity_audit``
    switches on) stay off, and switching them on is refused in one line that names ``transition_audit``."""

    @property
    def commit_state(self) -> bool:
        return False

    @commit_state.setter
    def commit_state(self, value: bool) -> None:
        if value:
            raise ConfigError(INTEGRITY_AUDIT_NEEDS_ONE_SERVER)


def stage_endpoint(index: int) -> str:
    return f"stage/{index}"


def stage_sizes(blocks: int, stages: int) -> list[int]:
    """Blocks per stage: as even as possible, the earlier stages taking the remainder."""
    if stages < 1:
        raise ConfigError(f"training.stages must be >= 1, not {stages}")
    if stages > blocks:
        raise ConfigError(f"training.stages = {stages} needs at least {stages} server blocks, but the split leaves "
                          f"the server {blocks}; lower stages or the split's head/tail blocks")
    return [blocks // stages + (1 if i < blocks % stages else 0) for i in range(stages)]


def split_trunk(trunk: ServerTrunk, stages: int) -> list[ServerTrunk]:
    """``trunk``'s blocks as ``stages`` consecutive trunks; each keeps the global index of its first block
    (layer types, LoRA seeds) and shares the block modules with ``trunk``."""
    b = trunk.blocks
    layers = list(b.layers)
    out, lo = [], 0
    for n in stage_sizes(len(layers), stages):
        out.append(ServerTrunk(_Blocks(layers[lo:lo + n], b.first + lo, b.config, b._rotary[0] if b._rotary else None,
                                       b.fam)))
        lo += n
    return out


def stage_bounds(head_blocks: int, trunk_blocks: int, stages: int) -> list[tuple[int, int]]:
    """``(first block, end block)`` of every stage in the unsplit model's numbering."""
    out, lo = [], head_blocks
    for n in stage_sizes(trunk_blocks, stages):
        out.append((lo, lo + n))
        lo += n
    return out


class ChainTrunk(nn.Module):
    """The stages' trunks run one after the other (each on its stage's device): the whole server trunk, for
    evaluation without the wire and for counting parameters."""

    def __init__(self, stages: Sequence[Server]):
        super().__init__()
        self.parts = nn.ModuleList([s.trunk for s in stages])
        self._devices = [s.device for s in stages]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        for part, device in zip(self.parts, self._devices, strict=True):
            hidden = part(hidden.to(device), attention_mask.to(device), position_ids.to(device))
        return hidden


class StageChain(NoOutputCommitments):
    """S stage parties that look like one server to the clients (see the module docstring)."""

    def __init__(self, stages: Sequence[Server]):
        if len(stages) < 2:
            raise ConfigError("a stage chain needs at least 2 stages; S = 1 is a plain Server")
        self.stages = list(stages)
        self.transport = self.stages[0].transport
        self.trunk = ChainTrunk(self.stages)
        # Fed by the first stage's activations and the last stage's gradients: what crossed from the clients.
        self.inbox_taps: list[Callable[[ActivationMsg | GradientMsg], None]] = []
        self.stages[0].inbox_taps.append(self._from_heads)
        self.stages[-1].inbox_taps.append(self._from_tails)

    def _from_heads(self, msg: ActivationMsg | GradientMsg) -> None:
        if isinstance(msg, ActivationMsg):
            for tap in self.inbox_taps:
                tap(msg)

    def _from_tails(self, msg: ActivationMsg | GradientMsg) -> None:
        if isinstance(msg, GradientMsg):
            for tap in self.inbox_taps:
                tap(msg)

    # --- the protocol (suite.engine.step) ---------------------------------------------------------------

    def forward(self, client_ids: Sequence[int], step: int | Mapping[int, int]) -> None:
        for stage in self.stages:
            stage.forward(client_ids, step)

    def backward(self, step: int | None = None) -> None:
        """Each stage backpropagates and steps, last to first. A stage that refuses a client's update (its
        gradient would make that stage's values non-finite) sends it no gradient; the stages before it then
        refuse that client too, and ``UpdateRefused`` names it once every stage is done."""
        refused: dict[int, str] = {}
        for i in reversed(range(len(self.stages))):
            try:
                self.stages[i].backward(step, skip=refused)
            except UpdateRefused as e:
                refused.update({c: f"stage {i}: {why}" if c not in refused else refused[c]
                                for c, why in e.clients.items()})
        if refused:
            raise UpdateRefused(refused)

    # --- what the rest of the suite asks of "the server" ------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    @property
    def adapters(self) -> dict[int, str]:
        return self.stages[0].adapters

    @property
    def bounds(self):
        return self.stages[0].bounds

    @bounds.setter
    def bounds(self, value) -> None:
        for stage in self.stages:
            stage.bounds = value

    @property
    def updates(self) -> bool:
        return all(s.updates for s in self.stages)

    @updates.setter
    def updates(self, value: bool) -> None:
        for stage in self.stages:
            stage.updates = value

    @property
    def policy(self):
        return None

    @policy.setter
    def policy(self, value) -> None:
        if value is not None:
            raise ConfigError("a whole-server policy (malicious_server) needs training.stages = 1; with stages > 1 "
                              "use the malicious_stage threat, whose policy runs on one stage")

    @property
    def optimizer_steps(self) -> dict[str, int]:
        """Optimiser steps per stage and adapter set: ``"stage<i>"`` or ``"stage<i>:<adapter>"``."""
        return {f"stage{i}" + (f":{k}" if k is not None else ""): v
                for i, s in enumerate(self.stages) for k, v in s.optimizer_steps.items()}

    @property
    def pending_clients(self) -> list[int]:
        return self.stages[0].pending_clients

    def discard_pending(self) -> None:
        for stage in self.stages:
            stage.discard_pending()

    def activate_for(self, client_id: int) -> None:
        for stage in self.stages:
            stage.activate_for(client_id)

    def expect(self, shape: tuple[int, ...] | None = None, kind: str | None = None) -> Expect:
        return self.stages[0].expect(shape, kind)


def build_chain(trunk: ServerTrunk, stages: int, make: Callable[[ServerTrunk, dict], Server]) -> StageChain:
    """Split ``trunk`` into ``stages`` stage parties; ``make(part, wiring)`` builds one ``Server`` over a part
    with ``wiring`` (its ``name``, ``up`` and ``down`` endpoints)."""
    parts = split_trunk(trunk, stages)
    servers = []
    for i, part in enumerate(parts):
        wiring = {"name": stage_endpoint(i),
                  "up": stage_endpoint(i - 1) if i > 0 else None,
                  "down": stage_endpoint(i + 1) if i < len(parts) - 1 else None}
        servers.append(make(part, wiring))
    return StageChain(servers)
