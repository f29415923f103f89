"""Split inference (issue 25): split generation through the parties and the byte-level wire, each part with
its own KV cache, equals the unsplit model's ``generate`` token for token (greedy), on two families; sampling
is seeded; the server's view (its inbox, its cache) is what a curious server or a memory dump holds."""

import pytest
import torch

from suite.engine.decoding import ClientDecoder, TrunkDecoder
from suite.engine.inference import Sampling, generate
from suite.engine.models import tiny_model
from suite.engine.parties import Batches, Client, Server
from suite.engine.protocol import ActivationMsg
from suite.engine.split import SplitSpec, split_model
from suite.engine.transport import InProcessTransport
from suite.errors import ConfigError, ProtocolError


def _parties(model, k: int, m: int = 1):
    split = split_model(model, SplitSpec(k, m))
    transport = InProcessTransport()
    ids = torch.zeros(1, 4, dtype=torch.long)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    client = Client(0, split.client_head, split.client_tail, Batches(data, 1, 0), transport, lr=0.0)
    server = Server(split.server_trunk, transport, lr=0.0)
    return ClientDecoder(client), TrunkDecoder(server)


def _prompt(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_split_greedy_generation_equals_unsplit_generate(family, k):
    # gemma3's tiny config alternates sliding (window 4) and global layers: the prompt and the generation
    # both run past the window, so every part's sliding cache is exercised
    model = tiny_model(family, num_layers=4).model.eval()
    prompt = _prompt(model.config.vocab_size, 7, seed=k)
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, pad_token_id=0)[:, prompt.shape[1]:]
    decoder, trunk = _parties(model, k)
    out, step = generate(decoder, trunk, prompt, 12)
    assert out.tolist() == ref.tolist()
    assert step == 12  # the prompt and 11 tokens crossed the wire; the last token is sampled, never sent


def test_generation_twice_restarts_every_cache():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    a = _prompt(model.config.vocab_size, 5, seed=1)
    first, step = generate(decoder, trunk, a, 6)
    generate(decoder, trunk, _prompt(model.config.vocab_size, 9, seed=2), 6, step=step)
    again, _ = generate(decoder, trunk, a, 6, step=100)
    assert again.tolist() == first.tolist()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    prompt = _prompt(model.config.vocab_size, 5, seed=3)
    s = Sampling(temperature=1.0, seed=7)
    one, _ = generate(decoder, trunk, prompt, 10, s)
    two, _ = generate(decoder, trunk, prompt, 10, s)
    other, _ = generate(decoder, trunk, prompt, 10, Sampling(temperature=1.0, seed=8))
    greedy, _ = generate(decoder, trunk, prompt, 10)
    top1, _ = generate(decoder, trunk, prompt, 10, Sampling(temperature=1.0, top_k=1, seed=8))
    assert one.tolist() == two.tolist()
    assert one.tolist() != other.tolist()
    assert top1.tolist() == greedy.tolist()
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(temperature=-1.0)


def test_server_sees_prompt_then_one_message_per_token_and_keeps_its_cache():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    seen: list[ActivationMsg] = []
    trunk.server.inbox_taps.append(seen.append)
    prompt = _prompt(model.config.vocab_size, 6, seed=4)
    out, _ = generate(decoder, trunk, prompt, 5)
    assert [m.hidden.shape[1] for m in seen] == [6, 1, 1, 1, 1]
    assert seen[0].position_ids.tolist() == [list(range(6))]  # the prompt opens a sequence
    assert all(m.position_ids is None for m in seen[1:])  # each token continues it
    # what the server received is the head output of the whole sequence (the head is causal)
    full = torch.cat([prompt, out[:, :-1]], 1)
    with torch.no_grad():
        split = split_model(model, SplitSpec(1, 1))
        direct = split.client_head(full, torch.ones_like(full), torch.arange(full.shape[1])[None])
    torch.testing.assert_close(torch.cat([m.hidden for m in seen], 1), direct, rtol=1e-5, atol=1e-5)
    keys, values = trunk.kv(0, 1)  # the trunk's first block (global index 1) cached every position it saw
    assert keys.shape[2] == values.shape[2] == full.shape[1]


def test_a_token_before_any_prompt_is_refused():
    model = tiny_model("llama", num_layers=4).model.eval()
    decoder, trunk = _parties(model, 1)
    decoder.start()
    decoder.length = 2  # the client skips its prompt
    decoder.send(0, torch.tensor([[5]]))
    with pytest.raises(ProtocolError, match="without a prompt"):
        trunk.serve([0], 0)
