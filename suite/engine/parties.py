"""The two parties of split learning. Each owns its modules and optimisers and speaks only through bytes.

One training step for one client is two round trips (docs/architecture.md)::

    client.send_activations   head forward           ──ActivationMsg──►  server.forward
    client.receive_hidden     tail forward, loss     ◄──ActivationMsg──
                              backward               ──GradientMsg────►  server.backward (+ optimiser step)
    client.receive_gradient   head backward + step   ◄──GradientMsg────

The server may serve several clients in one trunk pass (``batch_parallel``) and may keep one adapter set per
client on one shared frozen base (``per_client``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from suite.engine.commitment import (
    commit,
    digest_tensor,
    encode_reveal,
    for_adapter,
    frozen_digest,
    tensor_digest,
    trainable_state,
)
from suite.engine.device import module_device
from suite.engine.protocol import (
    TO_CLIENT,
    TO_SERVER,
    ActivationMsg,
    Bounds,
    Expect,
    GradientMsg,
    decode,
    encode,
)
from suite.engine.split import ClientHead, ClientTail, ServerTrunk, position_ids_for
from suite.engine.transport import SERVER, Transport, client_endpoint
from suite.errors import ProtocolError


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding targets (labels -100 are ignored), as HF computes it."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def per_record_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's own mean next-token cross-entropy over its non-padding targets, then the mean over rows:
    one record's gradient depends on that record alone (``causal_lm_loss`` divides by the batch's total target
    tokens, so one record's length rescales every other record's gradient). DP-SGD's per-example clipping
    bounds one record's effect only under this loss (``defenses.dp_sgd``). A row without targets adds 0."""
    per = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                          reduction="none")
    counts = (labels[:, 1:] != -100).sum(1).clamp_min(1)
    return (per.sum(1) / counts).mean()


def trainable(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of several modules, each once (a tied weight appears in head and tail)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def make_optimizer(params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        if self.input_ids.device == device:
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


class Batches:
    """Endless seeded mini-batches over one client's tokenised shard (a fresh permutation every epoch)."""

    def __init__(self, data: dict[str, torch.Tensor], batch_size: int, seed: int):
        self.data = data
        self.size = int(data["input_ids"].shape[0])
        self.batch_size = min(batch_size, self.size)
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        # distinct: a batch that tops an epoch's remainder up from the next epoch never holds a record twice
        # (DP-SGD's accountant assumes a record is clipped once per step); the next epoch still holds every
        # record once, the ones already in that batch moved after it
        self.distinct = False

    def next(self) -> Batch:
        if len(self._order) < self.batch_size:
            fresh = torch.randperm(self.size, generator=self.generator).tolist()
            if self.distinct and self._order:
                left = set(self._order)
                take = [i for i in fresh if i not in left][: self.batch_size - len(self._order)]
                taken = set(take)
                fresh = take + [i for i in fresh if i not in taken]
            self._order += fresh
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return Batch(*(self.data[k][idx] for k in ("input_ids", "attention_mask", "labels")))


class StepRejected(Exception):
    """Raised by a client hook that refuses what the server sent (tampering, hijacking). The client then
    skips its update for that step; the protocol goes on (it answers with a zero gradient)."""


# Hook signatures. Defenses append to these lists on a built client ("wrap, don't replace").
TokenHook = Callable[[Batch], Batch]  # the private batch -> the batch the client trains on (SanText)
InputHook = Callable[[torch.Tensor, Batch], torch.Tensor]  # input embeddings -> perturbed (DxP)
ActivationHook = Callable[[torch.Tensor, Batch], torch.Tensor]  # head output -> what is sent (DP noise)
HeadLossHook = Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor]  # (head out, input embeds) -> loss
HiddenHook = Callable[[int, torch.Tensor, Batch], torch.Tensor]  # (step, hidden from server) -> hidden or raise
GradientHook = Callable[[int, torch.Tensor, torch.Tensor, Batch], torch.Tensor]  # (step, grad, head out) -> grad
TailGradientHook = Callable[[torch.Tensor, Batch], torch.Tensor]  # tail's gradient -> what is sent (DP "both")


class Client:
    """Owns the client head and tail, its private shard and its optimiser.

    Defenses attach hooks: ``token_hooks`` replace the batch's tokens before anything is computed (text-level
    sanitisation: the client then trains on, and sends activations of, the sanitised batch); ``input_hooks`` perturb the input embeddings; ``activation_hooks`` transform the
    head output before it is sent (inside the autograd graph, so the head trains through them);
    ``head_loss_hooks`` add loss terms on the head (NoPeek), backpropagated together with the server's
    gradient; ``hidden_hooks`` and ``gradient_hooks`` inspect what the server sends back and may raise
    ``StepRejected`` (detectors, audits); ``tail_gradient_hooks`` transform the gradient the tail sends to
    the server (DP on both directions). With ``hide_lengths`` the client sends neither attention mask nor
    positions: the server treats every position as real, which changes nothing for the real positions
    (right padding, causal attention).
    """

    def __init__(
        self,
        client_id: int,
        head: ClientHead,
        tail: ClientTail,
        batches: Batches,
        transport: Transport,
        lr: float,
        device: torch.device | None = None,
    ):
        self.id = client_id
        self.endpoint = client_endpoint(client_id)
        self.head, self.tail = head, tail
        self.device = device if device is not None else module_device(head)  # where this client computes; received tensors land here
        self.batches = batches
        self.transport = transport
        self.optimizer = make_optimizer(trainable((head, tail)), lr)
        self.token_hooks: list[TokenHook] = []
        self.input_hooks: list[InputHook] = []
        self.activation_hooks: list[ActivationHook] = []
        self.head_loss_hooks: list[HeadLossHook] = []
        self.hidden_hooks: list[HiddenHook] = []
        self.gradient_hooks: list[GradientHook] = []
        self.tail_gradient_hooks: list[TailGradientHook] = []
        # Called when a step ends without the head's backward pass (rejected, or no updates while capturing):
        # a defense that keeps per-step state on the head (DP-SGD's per-example hooks) drops it here.
        self.skipped_backward_hooks: list[Callable[[], None]] = []
        self.loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = causal_lm_loss  # (logits, labels)
        self.hide_lengths = False
        # False while traffic is captured (``suite.engine.training.no_updates``): every message is computed and
        # sent as in a training step, but no optimiser steps, so the capture adds no training.
        self.updates = True
        self.optimizer_steps = 0  # optimiser steps taken (the training budget, checked per party)
        self.rejected_steps: list[int] = []
        self.sent_activation: torch.Tensor | None = None  # the head output of the current step (for audits)
        self.sent_gradient: torch.Tensor | None = None  # the tail gradient of the current step (for audits)
        self.received_commitment: bytes | None = None  # the server's commitment of the current step, if any
        self._batch: Batch | None = None
        self._head_out: torch.Tensor | None = None
        self._embeds: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._rejected = False

    def _recv(self, step: int, kind: type) -> ActivationMsg | GradientMsg:
        sent = self._head_out.shape if self._head_out is not None else None
        msg = decode(self.transport.recv(self.endpoint, SERVER), Expect(shape=sent), self.device)
        if not isinstance(msg, kind) or msg.client_id != self.id or msg.step != step or msg.direction != TO_CLIENT:
            raise ProtocolError(
                f"client {self.id} expected a {kind.__name__} for step {step}, got {type(msg).__name__} "
                f"for client {msg.client_id} step {msg.step}"
            )
        return msg

    def _skipped_backward(self) -> None:
        self._head_out = None
        for hook in self.skipped_backward_hooks:
            hook()

    def _reject(self, step: int) -> None:
        self._rejected = True
        if not self.rejected_steps or self.rejected_steps[-1] != step:
            self.rejected_steps.append(step)

    def send_activations(self, step: int, batch: Batch | None = None) -> None:
        """Round trip 1, out: head forward on the next private batch."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self._head_out is not None:  # the last step never reached the head's backward (abandoned)
            self._skipped_backward()
        self._rejected = False
        self._batch = (batch if batch is not None else self.batches.next()).to(self.device)
        for token_hook in self.token_hooks:
            self._batch = token_hook(self._batch)
        self._positions = position_ids_for(self._batch.attention_mask)
        embeds = None
        if self.input_hooks or self.head_loss_hooks:
            embeds = self.head.embed_tokens(self._batch.input_ids, self._positions)
            self._embeds = embeds.detach()
            for hook in self.input_hooks:
                embeds = hook(embeds, self._batch)
        out = self.head(self._batch.input_ids, self._batch.attention_mask, self._positions, inputs_embeds=embeds)
        for hook in self.activation_hooks:
            out = hook(out, self._batch)
        self._head_out = out
        self.sent_activation = out.detach()  # what this step sent (for audits)
        if self.hide_lengths:
            msg = ActivationMsg(self.id, step, TO_SERVER, out)
        else:
            msg = ActivationMsg(self.id, step, TO_SERVER, out, self._batch.attention_mask, self._positions)
        self.transport.send(self.endpoint, SERVER, encode(msg))

    def _expect_head_shape(self, tensor: torch.Tensor, what: str) -> None:
        """The server's reply must have the shape of what this head sent (else a one-line protocol error)."""
        if tensor.shape != self._head_out.shape:
            raise ProtocolError(f"server returned {what} of shape {tuple(tensor.shape)}, "
                                f"expected {tuple(self._head_out.shape)}")

    def receive_hidden(self, step: int) -> float:
        """Round trip 1, back, and round trip 2, out: tail forward, loss, backward; send the gradient.
        Returns the loss, or NaN when a hook rejected the server's hidden states."""
        if self._batch is None or self._head_out is None:
            raise ProtocolError(f"client {self.id} received hidden states before sending activations")
        msg = self._recv(step, ActivationMsg)
        self._expect_head_shape(msg.hidden, "hidden states")
        received = msg.hidden
        self.received_commitment = tensor_digest(msg.commitment)
        try:
            for hook in self.hidden_hooks:
                received = hook(step, received, self._batch)
        except StepRejected:
            self._reject(step)
            self._send_gradient(step, torch.zeros_like(msg.hidden))
            return float("nan")
        hidden = received.detach().requires_grad_(True)
        logits = self.tail(hidden, self._batch.attention_mask, self._positions)
        loss = self.loss(logits, self._batch.labels)
        loss.backward()
        grad = hidden.grad
        if not bool(torch.isfinite(grad).all()) or not bool(torch.isfinite(loss)):
            # The server's reply overflowed the tail: never send (or train on) what came of it. The zero
            # gradient below goes through the same hooks (noise) as any other, so the message's form says
            # nothing of which rows overflowed.
            self._reject(step)
            self._send_gradient(step, torch.zeros_like(hidden))
            return float("nan")
        self._send_gradient(step, grad)
        return float(loss.detach())

    def _send_gradient(self, step: int, grad: torch.Tensor) -> None:
        """The tail's gradient, through every tail-gradient hook (DP noise), to the server."""
        for tail_hook in self.tail_gradient_hooks:
            grad = tail_hook(grad, self._batch)
        self.sent_gradient = grad
        self.transport.send(self.endpoint, SERVER, encode(GradientMsg(self.id, step, TO_SERVER, grad)))

    def receive_gradient(self, step: int) -> None:
        """Round trip 2, back: head backward with the server's gradient (plus any head loss terms), then
        one optimiser step — skipped, with the tail's gradients dropped, if a hook rejected the step."""
        if self._head_out is None:
            raise ProtocolError(f"client {self.id} received a gradient it did not ask for")
        msg = self._recv(step, GradientMsg)
        self._expect_head_shape(msg.grad, "a gradient")
        grad = msg.grad
        if not self._rejected:
            try:
                for hook in self.gradient_hooks:
                    grad = hook(step, grad, self._head_out.detach(), self._batch)
            except StepRejected:
                self._reject(step)
        if self._rejected or not self.updates:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self._skipped_backward()
            return
        if self._head_out.requires_grad:
            objective = (self._head_out * grad).sum()  # backpropagates exactly ``grad`` into the head
            for hook in self.head_loss_hooks:
                objective = objective + hook(self._head_out, self._embeds, self._batch)
            objective.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer_steps += 1
        self._head_out = None


class UpdateRefused(ProtocolError):
    """``Server.backward`` refused the gradients of ``clients`` (client -> why): applied, they would have
    made a trunk value (or the head gradient sent back) non-finite. Their update was not applied and they got
    no reply; every other client of the pass got its reply and the update computed without them."""

    def __init__(self, clients: Mapping[int, str]):
        self.clients = dict(clients)
        super().__init__("; ".join(f"client {c}: {why}" for c, why in self.clients.items()))


class Server:
    """Owns the server trunk. ``adapters`` maps a client id to the name of its own LoRA adapter set
    (``per_client``); without it all clients share one set of trainable weights."""

    def __init__(
        self,
        trunk: ServerTrunk,
        transport: Transport,
        lr: float,
        adapters: dict[int, str] | None = None,
        device: torch.device | None = None,
        *,
        name: str = SERVER,
        up: str | None = None,
        down: str | None = None,
    ):
        # A pipeline stage (suite.engine.stages) is a Server whose ``up`` / ``down`` neighbour is another
        # stage's endpoint instead of the clients: it receives activations from ``up`` and gradients from
        # ``down`` as ``name``. None on a side: the clients are there, and it speaks to them as ``SERVER``.
        self.name, self.up, self.down = name, up, down
        self.trunk = trunk
        self.transport = transport
        self.device = device if device is not None else module_device(trunk)  # where the trunk computes; received tensors land here
        self.adapters = adapters or {}
        self.optimizers: dict[str | None, torch.optim.Optimizer | None] = {}
        if self.adapters:
            for name in self.adapters.values():
                self._activate(name)
                self.optimizers[name] = make_optimizer(trainable([trunk]), lr)
        else:
            self.optimizers[None] = make_optimizer(trainable([trunk]), lr)
        # (client ids, trunk input, trunk output, rows per client, sequence length per client, adapter)
        # A server that deviates from the protocol (FSHA, tampering) replaces its replies through this;
        # see suite.interfaces.attack.ServerPolicy. None = honest.
        self.policy = None
        # What any client may send (rows, length, magnitude); unbounded in process, set by `splitleak serve`.
        self.bounds = Bounds()
        self.updates = True  # False while traffic is captured: gradients are computed and sent, nothing steps
        self.optimizer_steps: dict[str | None, int] = dict.fromkeys(self.optimizers, 0)  # per adapter set
        # Callbacks that see every decoded message the server receives: a curious server's memory.
        self.inbox_taps: list[Callable[[ActivationMsg | GradientMsg], None]] = []
        # Called when a trunk pass is dropped without its backward (``discard_pending``, or a new pass over a
        # pending one): a defense that keeps per-pass state on the trunk (DP-SGD's hooks) drops it here.
        self.skipped_backward_hooks: list[Callable[[], None]] = []
        self._pending: tuple[list[int], torch.Tensor, torch.Tensor, list[int], list[int], str | None] | None = None
        # Commitments (suite.engine.commitment): when on, every hidden-state reply carries a digest of the trunk state
        # it was computed with, and ``reveal`` hands that state out for an audited step.
        self.commit_state = False
        self._frozen_digest: bytes | None = None
        self._committed: dict[int, tuple[int, dict[str, torch.Tensor], str | None]] = {}

    def _commit(self, ids: Sequence[int], steps: Mapping[int, int], adapter: str | None) -> torch.Tensor:
        if self._frozen_digest is None:
            self._frozen_digest = frozen_digest(self.trunk)
        state = trainable_state(self.trunk)
        # per_client: the pass computed with this adapter set only; another client's adapters neither enter
        # the commitment nor are ever revealed to this one
        keep = for_adapter(state, adapter)
        state = {n: t for n, t in state.items() if n in keep}
        for c in ids:
            self._committed[c] = (steps[c], state, adapter)
        return digest_tensor(commit(self._frozen_digest, state, adapter))

    def reveal(self, client_id: int, step: int) -> bytes:
        """The trunk state committed to in ``client_id``'s reply of ``step`` (safetensors bytes)."""
        entry = self._committed.get(client_id)
        if entry is None or entry[0] != step:
            raise ProtocolError(f"no committed state for client {client_id} step {step}")
        return encode_reveal(entry[1], entry[2])

    def activate_for(self, client_id: int) -> None:
        """Switch the trunk to ``client_id``'s own adapter set (no-op when adapters are shared)."""
        self._activate(self.adapters.get(client_id) if self.adapters else None)

    def _activate(self, adapter: str | None) -> None:
        if adapter is None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.trunk.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(adapter)

    def expect(self, shape: tuple[int, ...] | None = None, kind: str | None = None) -> Expect:
        """What the trunk accepts of an ``kind`` message ("activation", or "gradient": the default when
        ``shape`` is given): exactly its hidden size, finite values of a float dtype, ``shape`` exactly, and
        this server's ``bounds`` (rows and length of an activation, the magnitude of both)."""
        config = getattr(getattr(self.trunk, "blocks", None), "config", None)
        hidden_size = getattr(config, "hidden_size", None)
        b = self.bounds
        if (kind or ("gradient" if shape is not None else "activation")) == "gradient":
            return Expect(hidden_size=hidden_size, shape=shape, max_norm=b.gradient_norm)
        return Expect(hidden_size=hidden_size, shape=shape, max_rows=b.rows, max_length=b.length,
                      max_norm=b.activation_norm)

    def _link(self, client_id: int, stage: str | None) -> tuple[str, str]:
        """(this party's endpoint, the peer's) on the link to ``stage``, or to the client when None."""
        return (SERVER, client_endpoint(client_id)) if stage is None else (self.name, stage)

    def _send(self, client_id: int, stage: str | None, msg: ActivationMsg | GradientMsg) -> None:
        """``msg`` to the client, or (``stage``) to a neighbouring stage: a message between stages is
        addressed to a server-side party (TO_SERVER) and carries the padding mask a stage needs."""
        if stage is not None:
            extra = {"commitment": None} if isinstance(msg, ActivationMsg) else {}
            msg = dataclasses.replace(msg, direction=TO_SERVER, **extra)
        self.transport.send(*self._link(client_id, stage), encode(msg))

    def _recv(self, client_id: int, step: int, kind: type,
              shape: tuple[int, ...] | None = None) -> ActivationMsg | GradientMsg:
        expect = self.expect(shape, "gradient" if kind is GradientMsg else "activation")
        me, peer = self._link(client_id, self.down if kind is GradientMsg else self.up)
        msg = decode(self.transport.recv(me, peer), expect, self.device)
        if not isinstance(msg, kind) or msg.client_id != client_id or msg.step != step or msg.direction != TO_SERVER:
            raise ProtocolError(
                f"{me} expected a {kind.__name__} from {peer} for client {client_id} step {step}, got "
                f"{type(msg).__name__} for client {msg.client_id} step {msg.step}"
            )
        msg = self._in_trunk_dtype(msg, client_id)
        if isinstance(msg, ActivationMsg) and msg.attention_mask is None:  # lengths hidden: all positions real
            mask = torch.ones(msg.hidden.shape[:2], dtype=torch.long)
            msg = ActivationMsg(msg.client_id, msg.step, msg.direction, msg.hidden, mask, position_ids_for(mask))
        for tap in self.inbox_taps:
            tap(msg)
        return msg

    def _in_trunk_dtype(self, msg: ActivationMsg | GradientMsg, client_id: int) -> ActivationMsg | GradientMsg:
        """The message's tensor in the trunk's own dtype (one client's float32 must not break a bf16 pass
        for every client), refused when it does not fit that dtype."""
        dtype = next((p.dtype for p in self.trunk.parameters() if p.is_floating_point()), None)
        field = "hidden" if isinstance(msg, ActivationMsg) else "grad"
        tensor = getattr(msg, field)
        if dtype is None or tensor.dtype == dtype:
            return msg
        cast = tensor.to(dtype)
        if not bool(torch.isfinite(cast).all()):
            raise ProtocolError(f"client {client_id}'s {type(msg).__name__} does not fit the trunk's {dtype} "
                                "(values overflow it)")
        return dataclasses.replace(msg, **{field: cast})

    def forward(self, client_ids: Sequence[int], step: int | Mapping[int, int]) -> None:
        """Receive the head activations of ``client_ids``, run the trunk once over all of them
        (concatenated along the batch, right-padded to the longest), send each client its rows. ``step`` may
        map each client to its own step (clients of a remote server need not be in lockstep)."""
        ids = list(client_ids)
        steps = dict(step) if isinstance(step, Mapping) else dict.fromkeys(ids, step)
        adapter = self.adapters.get(ids[0]) if self.adapters else None
        if self.adapters and any(self.adapters.get(c) != adapter for c in ids):
            raise ProtocolError("per-client adapters cannot serve several clients in one trunk pass")
        self._activate(adapter)
        self.discard_pending()  # a pass whose gradients never came
        msgs = [self._recv(c, steps[c], ActivationMsg) for c in ids]
        length = max(m.hidden.shape[1] for m in msgs)
        hidden = torch.cat([_pad(m.hidden, length, 0.0) for m in msgs]).requires_grad_(True)
        mask = torch.cat([_pad(m.attention_mask, length, 0) for m in msgs])
        positions = position_ids_for(mask)
        out = self.trunk(hidden, mask, positions)
        rows = [m.hidden.shape[0] for m in msgs]
        lengths = [m.hidden.shape[1] for m in msgs]
        self._pending = (ids, steps, hidden, mask, out, rows, lengths, adapter)
        first = steps[ids[0]]
        commitment = self._commit(ids, steps, adapter) if self.commit_state else None
        sent = out if self.policy is None else self.policy.on_forward(ids, first, hidden.detach(), mask, out.detach())
        for c, t, part, m in zip(ids, lengths, sent.split(rows), mask.split(rows), strict=True):
            if self.down is None:
                reply = ActivationMsg(c, steps[c], TO_CLIENT, part[:, :t], commitment=commitment)
            else:
                reply = ActivationMsg(c, steps[c], TO_SERVER, part[:, :t], m[:, :t], position_ids_for(m[:, :t]))
            self._send(c, self.down, reply)

    @property
    def pending_clients(self) -> list[int]:
        """The clients whose forward pass awaits their gradient (empty when none)."""
        return list(self._pending[0]) if self._pending is not None else []

    def discard_pending(self) -> None:
        """Drop a forward pass whose gradients will not come (a client died mid-step)."""
        if self._pending is not None:
            for hook in self.skipped_backward_hooks:
                hook()
        self._pending = None

    def backward(self, step: int | None = None, skip: Mapping[int, str] | None = None) -> None:
        """Receive each client's gradient, backpropagate through the trunk once, take one optimiser step
        (gradients of the clients in one pass add up), and send each client the gradient of its input.

        An update that would make any trunk value non-finite is never applied: when the pass's parameter
        gradients (or the head gradients) are not finite, with their squares summed in float32 so that
        AdamW's second moment stays finite too, each client's rows are run alone through the (unchanged)
        trunk to find the ones that cause it; those get no reply (``UpdateRefused`` names them, raised after
        the others were served) and the step is taken with the other clients' gradients only.

        ``skip`` (client -> why): clients whose gradient will not come because a later pipeline stage refused
        their update; they are refused here too (no contribution, no reply)."""
        if self._pending is None:
            raise ProtocolError("server.backward called without a pending forward pass")
        ids, steps, hidden, mask, out, rows, lengths, adapter = self._pending
        self._pending = None
        if step is not None and any(s != step for s in steps.values()):
            raise ProtocolError(f"server.backward for step {step}, but the pending pass is for steps {steps}")
        length = hidden.shape[1]
        skip = dict(skip or {})
        grads = [hidden.new_zeros(n, t, hidden.shape[2]) if c in skip
                 else self._recv(c, steps[c], GradientMsg, (n, t, hidden.shape[2])).grad
                 for c, n, t in zip(ids, rows, lengths, strict=True)]
        for g, n, t in zip(grads, rows, lengths, strict=True):
            if tuple(g.shape[:2]) != (n, t) or g.shape[2] != hidden.shape[2]:
                raise ProtocolError(f"gradient of shape {tuple(g.shape)} does not match the activations sent")
        optimizer = self.optimizers[adapter]
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        full = torch.cat([_pad(g, length, 0.0) for g in grads])
        out.backward(full)
        del out
        grad = hidden.grad
        refused: dict[int, str] = {}
        if not self._finite_update(optimizer, grad):
            grad, refused = self._without_culprits(optimizer, ids, rows, hidden.detach(), mask, full)
        refused.update({c: why for c, why in skip.items() if c in ids})
        if optimizer is not None:
            if len(refused) < len(ids) and self.updates:
                optimizer.step()
                self.optimizer_steps[adapter] += 1
                if self.policy is not None:
                    self.policy.on_update(ids, steps[ids[0]], self.trunk)
            else:
                optimizer.zero_grad(set_to_none=True)
        if self.policy is not None:
            grad = self.policy.head_gradient(ids, steps[ids[0]], hidden.detach(), mask, grad)
        for c, part, t in zip(ids, grad.split(rows), lengths, strict=True):
            if c in refused:
                continue
            self._send(c, self.up, GradientMsg(c, steps[c], TO_CLIENT, part[:, :t]))
        if refused:
            raise UpdateRefused(refused)

    @staticmethod
    def _finite_update(optimizer: torch.optim.Optimizer | None, head_grad: torch.Tensor) -> bool:
        """Whether the gradients now on the optimiser's parameters, and ``head_grad``, have a finite sum of
        squares in float32 (so every value, and AdamW's second moment after the step, is finite)."""
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        squares = [p.grad.detach().float().square().sum() for p in params if p.grad is not None]
        squares.append(head_grad.detach().float().square().sum())
        return bool(torch.isfinite(torch.stack([s.to(squares[-1].device) for s in squares]).sum()))

    def _pass(self, optimizer: torch.optim.Optimizer | None, hidden: torch.Tensor, mask: torch.Tensor,
              grad: torch.Tensor) -> torch.Tensor | None:
        """A fresh trunk pass over ``hidden`` backpropagating ``grad``: the head gradient, with the parameter
        gradients left in place, or None (and none left) when that update would not be finite."""
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        h = hidden.detach().requires_grad_(True)
        self.trunk(h, mask, position_ids_for(mask)).backward(grad)
        if self._finite_update(optimizer, h.grad):
            return h.grad
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        return None

    def _without_culprits(self, optimizer, ids: list[int], rows: list[int], hidden: torch.Tensor,
                          mask: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """The pass's update was not finite: find the clients whose rows make it so (each alone), and leave
        the update of the others on the parameters. Returns the head gradient (zero on refused rows) and the
        refused clients."""
        starts = [sum(rows[:i]) for i in range(len(rows))]
        spans = {c: (a, n) for c, a, n in zip(ids, starts, rows, strict=True)}
        why = "its gradient would have made trunk values non-finite; the update was not applied"
        refused = {c: why for c, (a, n) in spans.items()
                   if self._pass(optimizer, hidden[a:a + n], mask[a:a + n], full[a:a + n]) is None}
        if not refused:  # no one alone: together, then (all of them are refused)
            refused = dict.fromkeys(ids, "the gradients of this pass together would have made trunk values "
                                         "non-finite; the update was not applied")
        keep = torch.tensor([i for c in ids if c not in refused for i in range(spans[c][0], sum(spans[c]))],
                            dtype=torch.long, device=hidden.device)
        grad = torch.zeros_like(hidden)
        if len(keep):
            kept = self._pass(optimizer, hidden[keep], mask[keep], full[keep])
            if kept is None:
                refused = dict.fromkeys(ids, "the gradients of this pass would have made trunk values "
                                             "non-finite; the update was not applied")
            else:
                grad[keep] = kept
        elif optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        return grad, refused


def _pad(x: torch.Tensor, length: int, value: float) -> torch.Tensor:
    """Right-pad dimension 1 to ``length`` (padding is masked out and never attended to under causality)."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad, value=value)
