"""One protocol step over the parties: the only place the order of split training's messages is written.

A training step is two round trips (docs/architecture.md). ``forward``: every client's head sends its activations, the
server runs the trunk once over all their rows, every tail computes its loss and sends the gradient of the
trunk's output. ``backward``: the server backpropagates (one optimiser step for the group) and sends each head
its gradient; each head steps. ``training_step`` is the two, for a group of clients the server serves together
(``batch_parallel`` serves them all at once; ``serial`` and ``per_client`` one group of one after another).

Every caller uses it: the strategies (``suite.engine.training``), the traffic capture
(``suite.experiment.cell``), the benches (``suite.harness``) and a client whose server runs in another process
(``suite.net.parties``: ``server=None``, the server's half runs on the far side of the transport, answering the
messages as they arrive). ``local_forward`` is the same forward pass computed in one place without the wire
(evaluation of the deployed model).

With ``[training] stages = S`` > 1 the ``server`` is a ``suite.engine.stages.StageChain``: the S stage parties,
which look like one server to the clients (its ``forward`` runs the stages in order, its ``backward`` in
reverse, every message between stages crossing the transport as bytes). Inference is ``generation_step``:
``forward`` without the tails' gradient, each part with its KV cache (``suite.engine.decoding``); the generation
loop is ``suite.engine.inference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from suite.engine.decoding import ClientDecoder, TrunkDecoder
from suite.engine.parties import Batch, Client, Server
from suite.engine.split import position_ids_for


def forward(clients: Sequence[Client], server: Server | None, step: int,
            batches: Sequence[Batch] | None = None) -> list[float]:
    """Round trip 1, and the tails' half of round trip 2: heads out (each client's next private batch, or
    ``batches[i]``), the trunk once over every client's rows, each tail's loss and gradient back to the
    server. Returns each client's loss (NaN where a hook rejected the server's reply)."""
    for i, client in enumerate(clients):
        client.send_activations(step, None if batches is None else batches[i])
    if server is not None:
        server.forward([c.id for c in clients], step)
    return [client.receive_hidden(step) for client in clients]


def backward(clients: Sequence[Client], server: Server | None, step: int) -> None:
    """The rest of round trip 2: the server backpropagates the tails' gradients through the trunk and steps,
    then each head takes its gradient and steps."""
    if server is not None:
        server.backward(step)
    for client in clients:
        client.receive_gradient(step)


def training_step(clients: Sequence[Client], server: Server | None, step: int,
                  batches: Sequence[Batch] | None = None) -> list[float]:
    """One training step of ``clients``, served together (one trunk pass over their rows, one server
    optimiser step on their summed gradients). ``server=None``: it runs in another process."""
    losses = forward(clients, server, step, batches)
    backward(clients, server, step)
    return losses


def generation_step(decoders: Sequence[ClientDecoder], trunk: TrunkDecoder | None, step: int,
                    new_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One step of split generation: each client's head sends its new positions (``new_ids[i]``: the prompt,
    then its last sampled token), the server runs the trunk on them with its KV cache and replies, each tail
    returns the next token's logits [1, V]. ``trunk=None``: the server runs in another process."""
    for decoder, ids in zip(decoders, new_ids, strict=True):
        decoder.send(step, ids)
    if trunk is not None:
        _serve_generation(trunk, [d.client.id for d in decoders], step)
    return [decoder.receive(step) for decoder in decoders]


def _serve_generation(trunk: TrunkDecoder, client_ids: list[int], step: int) -> None:
    """The server's side of a generation step (pipeline stages slot in here)."""
    trunk.serve(client_ids, step)


def local_forward(client: Client, server: Server, batch: Batch, deployed: bool = True) -> torch.Tensor:
    """The logits of ``client``'s model (its head and tail, the server's trunk as it is activated) on
    ``batch``, computed here without the wire. ``deployed``: every client hook that changes what is sent
    (token replacement, input-embedding noise, what the activation hooks do to the head output) runs, with
    the client's own randomness, as in ``forward``; ``False`` is the bare fine-tuned model."""
    b = batch.to(client.device)
    if deployed:
        for token_hook in client.token_hooks:
            b = token_hook(b)
    pos = position_ids_for(b.attention_mask)
    embeds = None
    if deployed and client.input_hooks:
        embeds = client.head.embed_tokens(b.input_ids, pos)
        for hook in client.input_hooks:
            embeds = hook(embeds, b)
    hidden = client.head(b.input_ids, b.attention_mask, pos, inputs_embeds=embeds)
    if deployed:
        for hook in client.activation_hooks:
            hidden = hook(hidden, b)
    hidden = server.trunk(hidden.to(server.device), b.attention_mask.to(server.device), pos.to(server.device))
    return client.tail(hidden.to(client.device), b.attention_mask, pos)
