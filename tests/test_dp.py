"""DP on the head output: exact no-op at sigma 0, noise as configured, clipping, honest epsilon."""

import copy
import math
from collections import Counter

import pytest
import torch

from defenses.dp import DPConfig, GaussianDPDefense, _DPHook
from suite.engine.models import tiny_model
from suite.engine.noise import NoiseStream
from suite.engine.parties import Batch
from suite.engine.split import SplitSpec
from suite.errors import ConfigError
from suite.experiment.cell import attack_trained, train_split
from suite.experiment.config import parse_config
from suite.interfaces.attack import make_attack
from suite.interfaces.defense import Defense, make_defense
from suite.interfaces.threats import get_threat

CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1},
             "shadow": {"generator": "records", "size": 16, "seed": 2}},
    "training": {"clients": 2, "steps": 3, "batch_size": 2},
})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


def test_sigma_zero_without_clipping_matches_the_undefended_run(base):
    plain = train_split(CFG, SplitSpec(1, 1), base)
    dp = train_split(CFG, SplitSpec(1, 1), base,
                     defense=make_defense("dp_gaussian", {"sigma": 0, "clip": 0, "freeze": False}))
    assert dp.prepared.session.losses == plain.prepared.session.losses
    assert dp.utility == plain.utility


def _batch(n=64, t=8):
    ids = torch.randint(5, 100, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, 6:] = 0
    return Batch(ids, mask, ids)


def test_measured_noise_matches_sigma_and_clipping_bounds_norms():
    cfg = DPConfig(sigma=0.7, clip=2.0)
    hook = _DPHook(cfg, 2, NoiseStream.for_tests(0))
    batch = _batch()
    out = torch.randn(64, 8, 32) * 10
    noisy = hook(out, batch)
    assert hook.measured_std() == pytest.approx(0.7 * 4.0, rel=0.03)  # sigma x sensitivity (2C)
    clipper = _DPHook(DPConfig(sigma=0.0, clip=2.0), 2, NoiseStream.fresh())
    clipped = clipper(out, batch)
    norms = (clipped * batch.attention_mask.unsqueeze(-1)).flatten(1).norm(dim=1)
    assert torch.all(norms <= 2.0 + 1e-5)
    pad = batch.attention_mask == 0
    assert torch.all(noisy[pad] == 0) and torch.all(clipped[pad] == 0)  # padding leaves as zeros, noise-free
    assert out[pad].abs().sum() > 0  # (it was not zero before)


def test_laplace_noise_scale():
    hook = _DPHook(DPConfig(sigma=0.5, clip=1.0), 1, NoiseStream.for_tests(0))
    hook(torch.zeros(64, 8, 32), _batch())
    b = 0.5 * 2.0
    assert hook.measured_std() == pytest.approx(math.sqrt(2) * b, rel=0.03)  # Laplace std = sqrt(2) b


def _rdp_epsilon(sigma: float, k: int, delta: float) -> float:
    """By hand: k-fold Gaussian mechanism, RDP eps(a) = k a / (2 sigma^2), converted as Opacus does
    (Balle et al. 2020): eps = rdp - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)."""
    best = math.inf
    for a in [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)):
        rdp = k * a / (2 * sigma**2)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best


def test_epsilon_matches_a_hand_computed_value():
    defense = GaussianDPDefense(DPConfig(sigma=2.0, clip=1.0, delta=1e-5))
    hook = _DPHook(defense.config, 2, NoiseStream.fresh())
    defense.hooks.append(hook)
    batch = _batch(4)
    for _ in range(10):
        hook(torch.randn(4, 8, 32), batch)
    assert defense.releases() == 10
    assert defense.epsilon() == pytest.approx(_rdp_epsilon(2.0, 10, 1e-5), rel=1e-3)
    more = GaussianDPDefense(defense.config)
    more.hooks.append(_DPHook(defense.config, 2, NoiseStream.fresh()))
    for _ in range(40):
        more.hooks[0](torch.randn(4, 8, 32), batch)
    assert math.isfinite(defense.epsilon()) and more.epsilon() > defense.epsilon()


def test_report_of_a_training_run(base):
    trained = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", {"sigma": 1.0}))
    report = trained.defense.report()
    # 3 training steps of batch 2 over shards of 4 records, plus one capture pass: each record 2-3 times; the
    # held-out pass (utility under the defense) releases its rows too, and the tiny character tokenizer's
    # 12-token rows of a held-out record can equal a training record's row (the same input to the mechanism).
    # Held-out rows can also equal each other. Any row: <= 4 releases in training, plus its copies held out.
    held_out = Counter(tuple(r) for r in trained.prepared.eval_data["input_ids"].tolist())
    assert 1 <= report["releases_per_record"] <= 4 + max(held_out.values())
    assert math.isfinite(report["epsilon"]) and report["epsilon"] > 0
    assert report["measured_noise_std"] == pytest.approx(2.0, rel=0.1)


def test_strong_noise_reduces_leakage(base):
    threat = get_threat("curious_server")
    attack = make_attack("nearest_embedding", threat)
    plain = attack_trained(train_split(CFG, SplitSpec(1, 1), base), threat, attack, CFG).metrics
    noisy = attack_trained(train_split(CFG, SplitSpec(1, 1), base,
                                       defense=make_defense("dp_gaussian", {"sigma": 2.0, "clip": 1.0})),
                           threat, attack, CFG).metrics
    assert noisy.token_accuracy < plain.token_accuracy - 0.3


@pytest.mark.parametrize(("params", "needle"), [({"sigma": -1}, "sigma"), ({"clip": -2}, "clip"),
                                                ({"delta": 2}, "delta"), ({"epsilon": 1}, "no parameter")])
def test_bad_dp_parameters(params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_defense("dp_gaussian", params)


class _FakeClient:
    def __init__(self, cid):
        self.id = cid
        self.activation_hooks, self.tail_gradient_hooks, self.hide_lengths = [], [], False
        self.head, self.tail, self.optimizer = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None


class _FakeSession:
    def __init__(self, n=2):
        self.clients = [_FakeClient(i) for i in range(n)]


def _release(params, out, batch):
    """One run: install the defense on fresh clients, release ``out`` through client 0's hook."""
    session = _FakeSession()
    defense = make_defense("dp_gaussian", params)
    defense.install(session)
    return session.clients[0].activation_hooks[0](out, batch)


def _regenerate_and_subtract(received, params, out, batch):
    """The server's attack: it holds the config, so it redraws the noise the way the config says (the test-only
    derivation from the config's seed and the client id, with the config's seed or the default 0) and
    subtracts it. Returns the residual noise std of the best guess, against the clipped activation (ground
    truth, for scoring only)."""
    clipped = _DPHook(DPConfig(sigma=0.0, clip=params["clip"]), 2, NoiseStream.fresh())(out, batch)
    best = math.inf
    for seed in {params.get("seed") or 0, 0}:
        redrawn = _DPHook(DPConfig(**{**params, "seed": seed}), 2, NoiseStream.for_tests(seed, 0))
        guess = received - (redrawn(out, batch) - clipped)  # the redrawn noise, subtracted
        best = min(best, float((guess - clipped)[batch.attention_mask == 1].std()))
    return best


def test_two_runs_with_the_same_config_draw_different_noise_and_the_server_cannot_subtract_it():
    params = {"sigma": 0.5, "clip": 1.0}
    batch = _batch(8)
    out = torch.randn(8, 8, 32)
    first, second = _release(params, out, batch), _release(params, out, batch)
    assert not torch.equal(first, second)
    scale = 0.5 * 2.0  # sigma x sensitivity
    residual = _regenerate_and_subtract(first, params, out, batch)
    assert residual > 0.9 * scale  # the noise is still all there
    # The same attack on an (unsafe, test-only) fixed seed removes the noise exactly: the attack works.
    unsafe = {**params, "seed": 3}
    assert torch.equal(_release(unsafe, out, batch), _release(unsafe, out, batch))
    assert _regenerate_and_subtract(_release(unsafe, out, batch), unsafe, out, batch) < 1e-5


def test_hide_lengths_noises_padding_and_sends_no_mask():
    cfg = DPConfig(sigma=0.5, clip=1.0, hide_lengths=True, direction="both")
    hook = _DPHook(cfg, 2, NoiseStream.for_tests(0))
    batch = _batch()
    noisy = hook(torch.randn(64, 8, 32), batch)
    pad = batch.attention_mask == 0
    assert noisy[pad].std() == pytest.approx(1.0, rel=0.05)  # pads look like noise, not like zeros
    defense = make_defense("dp_gaussian", {"hide_lengths": True, "direction": "both"})
    session = _FakeSession()
    defense.install(session)
    assert all(c.hide_lengths for c in session.clients)
    grad = session.clients[0].tail_gradient_hooks[0](torch.zeros(64, 8, 32), batch)
    assert grad[pad].std() == pytest.approx(1.0, rel=0.05)  # the tail's gradient is noised at the pads too
    assert "covers: head activations" in defense.covers() and "sequence lengths" in defense.covers().split(";")[0]


@pytest.mark.parametrize(("params", "needle"), [
    ({"hide_lengths": True}, "direction = 'both'"),  # the old default: the gradient's zeros show the lengths
    ({"hide_lengths": True, "direction": "both", "sigma": 0}, "sigma > 0"),
    ({"hide_lengths": True, "direction": "both", "clip": 0}, "clip > 0"),
    ({"hide_lengths": True, "direction": "both", "grad_clip": 0}, "clip > 0"),
])
def test_hide_lengths_is_refused_with_the_setting_that_would_leak_them(params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_defense("dp_gaussian", params)


def _read_lengths(batch) -> torch.Tensor:
    """A server reading each row's length from what it received: the mask if sent; otherwise the last position
    whose activation or returned gradient is not exactly zero; otherwise the last position whose energy
    stands above the pure-noise level of the batch's final position (which is padding for most rows)."""
    if not batch.attention_mask.all():
        return batch.attention_mask.sum(1)
    tensors = [batch.hidden] + ([batch.gradient] if batch.gradient is not None else [])
    for t, after in zip(tensors, (1, 2)[: len(tensors)], strict=True):  # an honest gradient is zero from the last real position on
        nonzero = t.abs().sum(-1) > 0  # [B, T]
        if not nonzero.all():
            return torch.where(nonzero.any(1), nonzero.int().cumsum(1).argmax(1) + after, 0)
    energy = sum(t.pow(2).sum(-1) for t in tensors)  # [B, T]
    floor = energy[:, -1:].median()
    above = energy > 1.5 * floor
    return above.int().cumsum(1).argmax(1) + 1


def _length_accuracy(trained) -> float:
    batches = trained.capture.batches
    read = torch.cat([_read_lengths(b) for b in batches])
    return float((read == trained.capture.mask.sum(1)).float().mean())


def test_the_server_cannot_read_lengths_from_anything_it_receives_under_hide_lengths(base):
    """Every message the server received (activations, the tail's gradients, masks) is read for lengths. With
    hide_lengths (direction "both", the only form allowed now) the reader is at chance; the old default
    (hide_lengths with direction "activations", built here past the new refusal) gives every length away."""
    cfg = parse_config({**CFG.model_dump(include={"model", "data", "training"}),
                        "data": {**CFG.data.model_dump(), "max_length": 40}})
    params = {"sigma": 0.5, "clip": 1.0, "hide_lengths": True, "direction": "both"}
    hidden = train_split(cfg, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", params))
    lengths = hidden.capture.mask.sum(1)
    chance = float((lengths == lengths.mode().values).float().mean())  # always guessing the commonest length
    assert all(b.attention_mask.all() for b in hidden.capture.batches)
    assert _length_accuracy(hidden) <= chance + 0.15
    from suite.experiment.cell import _observations

    seen = _observations(get_threat("curious_server"), SplitSpec(1, 1), base, cfg, hidden.shadow, hidden.prepared,
                         hidden.capture, hidden.defense)
    assert set(seen.lengths) == {40}  # attacks are handed the lengths the server saw, not the clients' own
    old = make_defense("dp_gaussian", params)
    object.__setattr__(old.config, "direction", "activations")  # the configuration the old code accepted
    leaky = train_split(cfg, SplitSpec(1, 1), base, defense=old)
    assert _length_accuracy(leaky) == 1.0


def test_both_directions_noise_the_tail_gradient_and_account_for_it():
    defense = make_defense("dp_gaussian", {"sigma": 2.0, "clip": 1.0, "direction": "both", "grad_clip": 0.1})
    session = _FakeSession(1)
    defense.install(session)
    client = session.clients[0]
    batch = _batch(4)
    for _ in range(10):
        client.activation_hooks[0](torch.randn(4, 8, 32), batch)
        grad = client.tail_gradient_hooks[0](torch.randn(4, 8, 32) * 1e-3, batch)
    assert grad[batch.attention_mask == 1].std() == pytest.approx(2.0 * 0.2, rel=0.1)  # sigma x 2 grad_clip
    assert torch.all(grad[batch.attention_mask == 0] == 0)
    report = defense.report()
    assert report["releases_per_record"] == report["grad_releases_per_record"] == 10
    assert report["epsilon_activations"] == pytest.approx(_rdp_epsilon(2.0, 10, 1e-5), rel=1e-3)
    assert report["epsilon_gradients"] == pytest.approx(report["epsilon_activations"])
    assert report["epsilon"] == pytest.approx(_rdp_epsilon(2.0, 20, 1e-5), rel=1e-3)  # both, composed
    assert report["covers"] == ("covers: head activations (10 releases/record), tail gradients "
                                "(10 releases/record); not covered: sequence lengths, "
                                "floating-point attacks on Gaussian sampling")
    only = make_defense("dp_laplace", {"sigma": 2.0})
    only.install(_FakeSession(1))
    assert "not covered: tail gradients, sequence lengths" in only.covers()


class _HideLengthsOnly(Defense):
    """The engine's hide_lengths switch alone (no noise): what the server computes must not change."""

    def install(self, session) -> None:
        for client in session.clients:
            client.hide_lengths = True


def test_hide_lengths_computes_exactly_the_same_model(base):
    """Right padding + causal attention: treating every position as real changes nothing a real token sees."""
    from suite.engine.split import split_model

    cfg = parse_config({**CFG.model_dump(include={"model", "data", "training"}),
                        "data": {**CFG.data.model_dump(), "max_length": 48}})  # records shorter than 48: padding
    plain = train_split(cfg, SplitSpec(1, 1), base)
    hidden = train_split(cfg, SplitSpec(1, 1), base, defense=_HideLengthsOnly())
    assert hidden.prepared.session.losses == plain.prepared.session.losses
    assert hidden.utility == plain.utility
    assert all(b.attention_mask.all() for b in hidden.capture.batches)  # the server never saw a length
    assert not all(b.attention_mask.all() for b in plain.capture.batches)
    split = split_model(base.model, SplitSpec(1, 1))
    one = _batch(4)
    ids, mask = one.input_ids, one.attention_mask
    logits = split.forward(ids, mask)
    blind = split.forward(ids, torch.ones_like(mask))
    assert torch.equal(logits[mask == 1], blind[mask == 1])


def test_serve_and_client_refuse_a_fixed_noise_seed():
    from suite.errors import SplitleakError
    from suite.net.parties import refuse_unsafe_seeds

    cfg = parse_config({"model": {"name": "tiny-llama"},
                        "matrix": {"defenses": ["none", {"name": "dp_gaussian", "seed": 1}]}})
    with pytest.raises(SplitleakError, match="fixes its noise 'seed'"):
        refuse_unsafe_seeds(cfg)
    refuse_unsafe_seeds(CFG)  # the default has no seed


def _clipped_base_release(base, capture, clip: float) -> torch.Tensor:
    """What the untouched public head releases for the captured rows, clipped as the hook clips (no noise)."""
    from suite.engine.split import position_ids_for, split_model

    head = split_model(copy.deepcopy(base.model), SplitSpec(1, 1)).client_head
    with torch.no_grad():
        out = head(capture.true_ids, capture.mask, position_ids_for(capture.mask))
    return _DPHook(DPConfig(sigma=0.0, clip=clip), 2, NoiseStream.fresh())(out, Batch(capture.true_ids, capture.mask,
                                                                                     capture.true_ids))


def test_activation_dp_freezes_the_head_so_a_release_depends_on_its_own_record_only(base):
    """With a LoRA-trained head (the old behaviour, now freeze = false) every later release of any record
    depends on the other records through the head's weights, so per-record counting bounds nothing: ε is
    then reported as ∞ with no guarantee. By default the head is frozen and each release is exactly the
    clipped public head's output for that record."""
    frozen = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", {"sigma": 0, "clip": 1.0}))
    released = torch.cat([b.hidden for b in frozen.capture.batches])
    assert torch.allclose(released, _clipped_base_release(base, frozen.capture, 1.0), atol=1e-5)
    assert frozen.defense.report()["frozen_for_guarantee"] == ["head"]
    trained = train_split(CFG, SplitSpec(1, 1), base,
                          defense=make_defense("dp_gaussian", {"sigma": 0, "clip": 1.0, "freeze": False}))
    released = torch.cat([b.hidden for b in trained.capture.batches])
    assert not torch.allclose(released, _clipped_base_release(base, trained.capture, 1.0), atol=1e-5)
    noisy = train_split(CFG, SplitSpec(1, 1), base,
                        defense=make_defense("dp_gaussian", {"sigma": 1.0, "freeze": False}))
    report = noisy.defense.report()
    assert report["epsilon"] == math.inf and report["guarantee"].startswith("none: the head trained")
    assert report["covers"].startswith("covers: nothing formally")
    both = train_split(CFG, SplitSpec(1, 1), base, defense=make_defense("dp_gaussian", {"direction": "both"}))
    assert both.defense.report()["frozen_for_guarantee"] == ["head", "tail"]
    assert all(not p.requires_grad for c in both.prepared.session.clients
               for p in [*c.head.parameters(), *c.tail.parameters()])
    assert math.isfinite(both.defense.report()["epsilon"])


def test_a_record_two_clients_hold_is_counted_across_both():
    """Releases are counted per record over every client: the same record released by two clients has been
    released twice (the old per-client counters reported the larger of the two counts)."""
    defense = make_defense("dp_gaussian", {"sigma": 1.0})
    session = _FakeSession(2)
    defense.install(session)
    batch = _batch(4)
    for client in session.clients:
        for _ in range(3):
            client.activation_hooks[0](torch.randn(4, 8, 32), batch)
    assert defense.releases() == 6


def test_no_noise_or_no_clipping_covers_nothing():
    for params in ({"sigma": 0.0}, {"clip": 0.0}):
        defense = make_defense("dp_gaussian", params)
        session = _FakeSession(1)
        defense.install(session)
        session.clients[0].activation_hooks[0](torch.randn(4, 8, 32), _batch(4))
        assert defense.covers().startswith("covers: nothing formally") and defense.epsilon() == math.inf


def test_a_reply_that_overflows_the_tail_sends_nothing_of_it(base):
    """A server that replies with huge hidden states makes the tail's loss and gradient non-finite for the
    rows it chooses. The client rejects the step and sends a zero gradient through the same noise as any
    other, so neither the NaN pattern nor an un-noised value crosses; its parameters stay finite."""
    import dataclasses

    from suite.engine.training import train
    from suite.experiment.prepared import prepare
    from suite.interfaces.attack import ServerPolicy

    class Overflow(ServerPolicy):
        def on_forward(self, client_ids, step, hidden_in, attention_mask, honest_out):
            out = honest_out.clone()
            out[0] = 3e38  # one row only
            return out

    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
    prepared = prepare(CFG, SplitSpec(1, 1), loaded=loaded)
    make_defense("dp_gaussian", {"sigma": 1.0, "direction": "both", "freeze": False}).install(prepared.session)
    sent = []
    prepared.session.server.inbox_taps.append(lambda msg: sent.append(msg))
    prepared.session.server.policy = Overflow()
    train(prepared.session, 2)
    grads = [m.grad for m in sent if hasattr(m, "grad")]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(float(g.std()) > 0.5 for g in grads)  # noise (sigma x 2C = 2) on every gradient message
    client = prepared.session.clients[0]
    assert client.rejected_steps == [0, 1]
    assert all(bool(torch.isfinite(p).all()) for p in [*client.head.parameters(), *client.tail.parameters()])


@pytest.mark.parametrize("params", [{"clip": float("nan")}, {"grad_clip": float("nan"), "direction": "both"},
                                    {"sigma": float("inf")}, {"clip": float("inf")}, {"delta": float("nan")}])
def test_non_finite_dp_parameters_are_refused(params):
    with pytest.raises(ConfigError, match="finite"):
        make_defense("dp_gaussian", params)


def test_a_released_tail_gradient_depends_on_its_own_record_only(base):
    """The batch-mean loss scales every row's gradient by one over the whole batch's real targets: without the
    per-row rescaling, shortening the *other* rows changed record 0's release by about 3x."""
    import dataclasses

    from suite.experiment.prepared import prepare

    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
    prepared = prepare(CFG, SplitSpec(1, 1), loaded=loaded)
    make_defense("dp_gaussian", {"sigma": 0.0, "clip": 100.0, "direction": "both"}).install(prepared.session)
    client, server = prepared.session.clients[0], prepared.session.server
    ids = torch.randint(5, 100, (4, 12))
    sent = []
    server.updates = False  # the same trunk for both batches
    for step, others in enumerate((12, 2)):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1:, others:] = 0
        client.send_activations(step, Batch(ids, mask, ids.masked_fill(mask == 0, -100)))
        server.forward([0], step)
        client.receive_hidden(step)
        sent.append(client.sent_gradient[0].clone())
        server.backward(step)
        client.receive_gradient(step)
    torch.testing.assert_close(sent[0], sent[1], rtol=1e-4, atol=1e-7)
