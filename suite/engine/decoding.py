"""Each party's side of split *inference*: the same parties and wire as training, plus a KV cache per part.

Generation is incremental. The client's head runs on the prompt and sends its output; the server's trunk
runs on it, keeping the keys and values of its own blocks in its own cache, and returns hidden states; the
client's tail (with its cache) computes the next token's logits. From then on only the newest token's head
output crosses the wire. Every message is an ``ActivationMsg`` encoded to bytes, as in training; the mask and
positions it carries cover the new positions only (one sequence per client, no padding), so what the server
learns of lengths is what it learns anyway: one message per generated token.

``ClientDecoder`` wraps a built ``Client`` (its head, tail, transport and the defenses' hooks: token hooks
act on the prompt, input and activation hooks on every release); ``TrunkDecoder`` wraps a ``Server`` (its
trunk, inbox taps, bounds and dtype checks) and keeps one cache per client. ``suite.engine.step`` orders their
messages; ``suite.engine.inference`` is the generation loop.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from suite.engine.parties import Batch, Client, Server
from suite.engine.protocol import TO_CLIENT, TO_SERVER, ActivationMsg, Expect, decode, encode
from suite.engine.transport import SERVER, client_endpoint
from suite.errors import ProtocolError


def _config(module: torch.nn.Module):
    return module.blocks.config


class ClientDecoder:
    """The client's state during one generation: the head's and the tail's KV caches and how many positions
    they hold. ``start`` begins a new sequence (fresh caches)."""

    def __init__(self, client: Client):
        self.client = client
        self.length = 0
        self.head_cache: DynamicCache | None = None
        self.tail_cache: DynamicCache | None = None
        self.sent: list[torch.Tensor] = []  # every head output this sequence released (for audits and tests)
        self._pending: int | None = None  # positions sent and not answered yet

    def start(self) -> None:
        self.length = 0
        self.head_cache = DynamicCache(config=_config(self.client.head))
        self.tail_cache = DynamicCache(config=_config(self.client.tail))
        self.sent = []

    @torch.no_grad()
    def send(self, step: int, new_ids: torch.Tensor) -> None:
        """Head forward on ``new_ids`` ([1, n]: the prompt, then one token at a time) and send the output.
        Text-level hooks (SanText) replace the prompt's tokens; input hooks (DxP) and activation hooks (DP
        noise) act on every release, with the client's own randomness."""
        c = self.client
        if self.head_cache is None or self._pending is not None:
            raise ProtocolError(f"client {c.id}: send before start(), or twice without a reply")
        ids = new_ids.to(c.device)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ProtocolError(f"client {c.id}: generation takes one sequence [1, n], got {tuple(ids.shape)}")
        n = ids.shape[1]
        batch = Batch(ids, torch.ones_like(ids), ids)
        if self.length == 0:
            for token_hook in c.token_hooks:
                batch = token_hook(batch)
        positions = torch.arange(self.length, self.length + n, device=c.device).unsqueeze(0)
        mask = torch.ones(1, self.length + n, dtype=torch.long, device=c.device)
        embeds = None
        if c.input_hooks:
            embeds = c.head.embed_tokens(batch.input_ids, positions)
            for hook in c.input_hooks:
                embeds = hook(embeds, batch)
        out = c.head(batch.input_ids, mask, positions, inputs_embeds=embeds, cache=self.head_cache)
        for hook in c.activation_hooks:
            out = hook(out, batch)
        self.sent.append(out)
        self._pending = n
        self._batch = batch
        # The prompt carries its positions (0..P-1): a new sequence. A token carries its mask only: the next
        # position of the sequence the server's cache holds (the wire format bounds positions by the length).
        start = positions if self.length == 0 else None
        msg = ActivationMsg(c.id, step, TO_SERVER, out, batch.attention_mask, start)
        c.transport.send(c.endpoint, SERVER, encode(msg))

    @torch.no_grad()
    def receive(self, step: int) -> torch.Tensor:
        """The server's hidden states for the positions just sent, through the tail (with its cache): the
        logits [1, V] of the next token. Hidden hooks (detectors) may reject the reply (``StepRejected``)."""
        c = self.client
        if self._pending is None:
            raise ProtocolError(f"client {c.id} received hidden states it did not ask for")
        n, self._pending = self._pending, None
        hidden_size = _config(c.head).hidden_size
        msg = decode(c.transport.recv(c.endpoint, SERVER), Expect(shape=(1, n, hidden_size)), c.device)
        if not isinstance(msg, ActivationMsg) or msg.client_id != c.id or msg.step != step or msg.direction != TO_CLIENT:
            raise ProtocolError(f"client {c.id} expected the hidden states of step {step}, got {type(msg).__name__} "
                                f"for client {msg.client_id} step {msg.step}")
        hidden = msg.hidden
        for hook in c.hidden_hooks:
            hidden = hook(step, hidden, self._batch)
        positions = torch.arange(self.length, self.length + n, device=c.device).unsqueeze(0)
        self.length += n
        mask = torch.ones(1, self.length, dtype=torch.long, device=c.device)
        logits = c.tail(hidden.to(next(c.tail.parameters()).dtype), mask, positions, cache=self.tail_cache)
        return logits[:, -1].float()


class TrunkDecoder:
    """The server's state during generation: one KV cache of the trunk's blocks per client (what a dump of
    the server's memory holds), started afresh when a client's positions start at 0 again."""

    def __init__(self, server: Server):
        self.server = server
        self.caches: dict[int, DynamicCache] = {}
        self.lengths: dict[int, int] = {}
        self.replies: list[tuple[int, int, torch.Tensor]] = []  # (client, step, hidden returned), if recording
        self.record_replies = False

    @torch.no_grad()
    def serve(self, client_ids: list[int], step: int) -> None:
        """Receive each client's new positions, run the trunk on them with that client's cache, send back the
        hidden states."""
        server = self.server
        for c in client_ids:
            server.activate_for(c)
            msg = server._recv(c, step, ActivationMsg)
            n = msg.hidden.shape[1]
            if msg.hidden.shape[0] != 1:
                raise ProtocolError(f"client {c}: generation serves one sequence per client, got "
                                    f"{msg.hidden.shape[0]} rows")
            if msg.position_ids is not None:  # a prompt: a new sequence, the cache starts afresh
                self.caches[c] = DynamicCache(config=_config(server.trunk))
                self.lengths[c] = 0
            elif c not in self.caches:
                raise ProtocolError(f"client {c}: a token without a prompt before it (send the prompt first)")
            start = self.lengths[c]
            self.lengths[c] += n
            positions = torch.arange(start, start + n, device=server.device).unsqueeze(0)
            mask = torch.ones(1, self.lengths[c], dtype=torch.long, device=server.device)
            out = server.trunk(msg.hidden, mask, positions, cache=self.caches[c])
            if self.record_replies:
                self.replies.append((c, step, out.detach()))
            server.transport.send(SERVER, client_endpoint(c), encode(ActivationMsg(c, step, TO_CLIENT, out)))

    def kv(self, client_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the server's cache holds for ``client_id`` at global block ``layer``:
        [1, kv_heads, T, head_dim] each."""
        cache = self.caches[client_id]
        entry = cache.layers[layer]
        return entry.keys, entry.values
