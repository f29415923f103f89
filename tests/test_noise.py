"""Deployment noise comes from a cryptographic keystream: the old 32-bit-seeded generator's noise could be
regenerated and subtracted by a server that searches seeds; the new stream's cannot. The samplers have the
right distributions, Laplace never yields an infinity, and no defense draws its noise through a seeded
``torch.Generator`` or the global torch RNG."""

import copy
import dataclasses
import math
import os
import secrets

import pytest
import torch

from defenses.dp import DPConfig, _DPHook, snap_grid
from suite.engine.models import tiny_model
from suite.engine.noise import NoiseStream, client_stream
from suite.engine.parties import Batch
from suite.engine.split import SplitSpec
from suite.engine.training import train
from suite.experiment.config import parse_config
from suite.experiment.prepared import prepare
from suite.interfaces.defense import make_defense

SCALE = 2.0  # sigma 1 x sensitivity 2C, C = 1


def _batch(n=2, t=8):
    ids = torch.randint(5, 100, (n, t))
    mask = torch.ones(n, t, dtype=torch.long)
    return Batch(ids, mask, ids)


def _legacy_generator(seed64: int) -> torch.Generator:
    """The old ``client_generator``: a torch.Generator seeded with 64 bits (torch keeps the low 32)."""
    return torch.Generator().manual_seed(seed64)


def _seed_search(received: torch.Tensor, centre: int, radius: int) -> float:
    """The server's search over torch seeds ``centre ± radius``: regenerate the hook's Gaussian noise for each
    seed and subtract it. Returns the smallest residual std over the first 64 coordinates (the clipped
    activation is ~0.001 here; the wire carries noise of std SCALE; a wrong seed leaves about 1.4 SCALE)."""
    flat = received.flatten()
    best = math.inf
    for seed in range(max(centre - radius, 0), centre + radius):
        guess = torch.randn(received.shape, generator=torch.Generator().manual_seed(seed)).flatten()[:64] * SCALE
        residual = float((flat[:64] - guess).std())
        best = min(best, residual)
    return best


def test_the_old_generator_is_searchable_and_the_new_stream_is_not(monkeypatch):
    batch = _batch()
    out = torch.randn(2, 8, 16) * 1e-3
    config = DPConfig(sigma=1.0, clip=1.0)
    radius = 2**14  # a narrowed range (2^15 seeds) around the truth; the full 2^32 is minutes on a GPU
    # The old code (positive control): a 64-bit seed from secrets, of which torch keeps the low 32 bits.
    seed64 = secrets.randbits(64) | (1 << 40)  # high bits set: they are dropped all the same
    # The old hook: clip (a no-op at this norm), then torch.randn from the client's generator, times the scale.
    received = out + torch.randn(out.shape, generator=_legacy_generator(seed64)) * SCALE
    assert torch.equal(torch.randn(5, generator=_legacy_generator(seed64)),
                       torch.randn(5, generator=_legacy_generator(seed64 & 0xFFFFFFFF)))
    assert _seed_search(received, seed64 & 0xFFFFFFFF, radius) < 0.05 * SCALE  # the noise is gone
    # The new code: the attacker is even handed the first 4 bytes of every key the client drew.
    drawn: list[bytes] = []
    real_urandom = os.urandom

    def spy(n: int) -> bytes:
        drawn.append(real_urandom(n))
        return drawn[-1]

    monkeypatch.setattr(os, "urandom", spy)
    stream = client_stream(None, 0)
    received = _DPHook(config, 2, stream)(out, batch)
    assert drawn and stream.source == "os_random"
    centre = int.from_bytes(drawn[0][:4], "little")
    assert _seed_search(received, centre, radius) > 0.5 * SCALE  # no seed comes near: the noise stays


def test_streams_are_fresh_per_client_and_reproducible_only_from_a_test_seed():
    a, b = client_stream(None, 0), client_stream(None, 0)
    assert not torch.equal(a.normal((64,)), b.normal((64,)))
    assert torch.equal(client_stream(3, 1).normal((64,)), client_stream(3, 1).normal((64,)))
    assert not torch.equal(client_stream(3, 0).normal((64,)), client_stream(3, 1).normal((64,)))
    assert client_stream(3, 0).source == "fixed_seed_UNSAFE"


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double()
    m, s = float(x.mean()), float(x.std())
    return m, s, float(((x - m) ** 4).mean() / s**4)


def test_sampler_distributions():
    stream = NoiseStream.fresh()
    n = 400_000
    u = stream.uniform((n,))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=3e-3) and float(u.var()) == pytest.approx(1 / 12, rel=0.02)
    assert float((u < 0.1).float().mean()) == pytest.approx(0.1, abs=3e-3)
    m, s, kurt = _moments(stream.normal((n,)))
    assert m == pytest.approx(0, abs=0.01) and s == pytest.approx(1, rel=0.01) and kurt == pytest.approx(3, rel=0.05)
    normal = stream.normal((n,))
    assert float((normal.abs() < 1.959964).float().mean()) == pytest.approx(0.95, abs=3e-3)
    e = stream.exponential((n,))
    assert float(e.mean()) == pytest.approx(1, rel=0.01) and float((e > 1).float().mean()) == pytest.approx(
        math.exp(-1), abs=3e-3)
    m, s, kurt = _moments(stream.laplace((n,)))
    assert m == pytest.approx(0, abs=0.01) and s == pytest.approx(math.sqrt(2), rel=0.01)
    assert kurt == pytest.approx(6, rel=0.08)  # Laplace's kurtosis
    probs = torch.tensor([[0.1, 0.2, 0.7]]).repeat(50_000, 1)
    counts = torch.bincount(stream.categorical(probs), minlength=3).double() / 50_000
    assert torch.allclose(counts, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.01)


class _ExtremeStream(NoiseStream):
    """A keystream stuck at all-zero or all-one bytes: the extremes a uniform can take."""

    def __init__(self, byte: int):
        super().__init__(bytes(32))
        self.byte = byte

    def random_bytes(self, n: int) -> bytes:
        return bytes([self.byte]) * n


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_laplace_never_yields_an_infinity(byte):
    stream = _ExtremeStream(byte)
    assert torch.isfinite(stream.laplace((1000,))).all() and torch.isfinite(stream.normal((1000,))).all()
    hook = _DPHook(DPConfig(sigma=0.5, clip=1.0), 1, stream)
    assert torch.isfinite(hook(torch.randn(4, 8, 32), _batch(4))).all()


def test_the_old_laplace_sampler_emitted_minus_infinity(monkeypatch):
    """The old inverse-CDF sampler with torch.rand returning exactly 0 (it can): log1p(-1) = -inf."""
    u = torch.zeros(4) - 0.5
    assert torch.isinf(-torch.sign(u) * torch.log1p(-2 * u.abs())).all()  # the old formula at rand() = 0


def test_laplace_outputs_are_snapped_to_the_grid():
    """Mironov's snapping: every noised coordinate is a multiple of Λ (a power of two ≥ the scale) in ±B."""
    config = DPConfig(sigma=0.3, clip=1.0)
    hook = _DPHook(config, 1, NoiseStream.fresh())
    batch = _batch(4)
    batch.attention_mask[0, 5:] = 0
    noisy = hook(torch.randn(4, 8, 32), batch).double()
    lam, bound = snap_grid(0.3 * 2.0, 1.0)
    assert lam == 1.0 and bound == 8.0  # floor(16 x 0.6 - 1)
    real = batch.attention_mask.bool()
    assert torch.equal(noisy[real], torch.round(noisy[real] / lam) * lam)
    assert float(noisy.abs().max()) <= bound
    assert torch.all(noisy[~real] == 0)  # padding still leaves as exact zeros


CFG = parse_config({
    "model": {"name": "tiny-llama"},
    "data": {"max_length": 12, "private": {"generator": "records", "size": 8, "seed": 1}},
    "training": {"clients": 2, "steps": 1, "batch_size": 2},
})


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.mark.parametrize(("name", "params"), [
    ("dp_gaussian", {}), ("dp_gaussian", {"direction": "both", "hide_lengths": True}), ("dp_laplace", {}),
    ("dxp", {}), ("mid", {"sim_steps": 0}), ("bottleneck", {"rank": 8}), ("santext", {}),
])
def test_no_deployment_noise_is_drawn_through_a_seeded_torch_generator(base, monkeypatch, name, params):
    """Install each defense and train a step with ``torch.Generator`` and the global RNG's samplers watched:
    any draw of deployment noise through them fails the test (the data order's generator exists already)."""
    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model))
    prepared = prepare(CFG, SplitSpec(1, 1), loaded=loaded)

    class Refused(torch.Generator):
        def __init__(self, *args, **kwargs):
            raise AssertionError("deployment noise drawn through a torch.Generator")

    monkeypatch.setattr(torch, "Generator", Refused)
    make_defense(name, params).install(prepared.session)  # (layer initialisations may use the global RNG)
    state = torch.get_rng_state()
    train(prepared.session, 1)
    assert torch.equal(torch.get_rng_state(), state), "deployment noise drawn from the global torch RNG"


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_uniforms_stay_strictly_inside_the_unit_interval_and_exact(byte):
    u = _ExtremeStream(byte).uniform((4,))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(u, torch.full((4,), 2.0**-53 if byte == 0 else 1 - 2.0**-53, dtype=torch.float64))


def test_a_long_stream_moves_to_a_fresh_nonce_before_the_block_counter_wraps(monkeypatch):
    import suite.engine.noise as noise

    monkeypatch.setattr(noise, "SUBSTREAM_BYTES", 64)
    one = NoiseStream(bytes(32)).random_bytes(200)
    parts = NoiseStream(bytes(32))
    assert b"".join(parts.random_bytes(n) for n in (10, 100, 90)) == one  # however the draws are cut
    blocks = [one[i : i + 64] for i in range(0, 192, 64)]
    assert len(set(blocks)) == 3  # no sub-stream repeats another's keystream


def test_laplace_signs_are_single_fair_bits():
    stream = NoiseStream.fresh()
    before = stream.drawn
    bits = stream.bits((80_000,))
    assert stream.drawn - before == 10_000  # one bit per sign
    assert float(bits.float().mean()) == pytest.approx(0.5, abs=0.01)


class _LargestNoise(NoiseStream):
    """All-zero uniform words (the largest Laplace magnitude), then signs from ``sign_byte``."""

    def __init__(self, sign_byte: int):
        super().__init__(bytes(32))
        self.sign_byte, self.calls = sign_byte, 0

    def random_bytes(self, n: int) -> bytes:
        self.calls += 1
        return bytes(n) if self.calls == 1 else bytes([self.sign_byte]) * n  # magnitude, then sign


def _extreme_outputs(x: float, config: DPConfig) -> set[float]:
    """The outputs of the snapped Laplace hook for a 1-coordinate release of value ``x`` at the sampler's
    largest noise magnitude (an all-zero uniform word), both signs."""
    out = set()
    for sign_byte in (0x00, 0xFF):
        hook = _DPHook(config, 1, _LargestNoise(sign_byte))
        batch = Batch(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1))
        out.add(float(hook(torch.full((1, 1, 1), x), batch)))
    return out


def test_every_snapped_output_is_reachable_from_every_input():
    """The sampler's noise is bounded (|z| <= 36 b): with the old clamp far outside that range, the largest
    output of x = +C could not occur for x = -C (an infinite privacy loss). The clamp now sits inside it."""
    config = DPConfig(sigma=0.25, clip=1.0)
    assert _extreme_outputs(1.0, config) == _extreme_outputs(-1.0, config)
    lam, bound = snap_grid(0.25 * 2.0, 1.0)
    assert _extreme_outputs(1.0, config) == {bound, -bound}
    old_bound = max(2**20 * lam, 2.0)  # the old clamp: the extremes differed by the inputs' distance
    old = [round((x + 0.5 * 52 * math.log(2)) / lam) * lam for x in (1.0, -1.0)]
    assert old[0] != old[1] and max(old) < old_bound


def test_a_sigma_too_small_for_the_grid_has_no_guarantee():
    from defenses.dp import LaplaceDPDefense

    defense = LaplaceDPDefense(DPConfig(sigma=0.02, clip=1.0))  # C = 25 b: beyond the clamp's room
    hook = _DPHook(defense.config, 1, NoiseStream.fresh())
    defense.hooks.append(hook)
    hook(torch.randn(2, 4, 8), _batch(2, 4))
    assert defense.epsilon() == math.inf and defense.guarantee().startswith("none: sigma too small")
    fine = LaplaceDPDefense(DPConfig(sigma=0.5, clip=1.0))
    fine.hooks.append(_DPHook(fine.config, 1, NoiseStream.fresh()))
    fine.hooks[0](torch.randn(2, 4, 8), _batch(2, 4))
    assert 2.0 < fine.epsilon() < 2.0 + 1e-4  # 1 release: 1/sigma plus 32 coordinates' snapping terms


def test_dp_hooks_refuse_a_torch_generator():
    with pytest.raises(TypeError, match="NoiseStream"):
        _DPHook(DPConfig(), 2, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("norm", [1, 2])
def test_clipping_holds_in_the_dtype_that_is_sent(dtype, norm):
    hook = _DPHook(DPConfig(sigma=0.0, clip=1.0), norm, NoiseStream.fresh())
    out = (torch.randn(64, 8, 32) * 7).to(dtype)
    sent = hook(out, _batch(64))
    assert sent.dtype == dtype
    assert float(sent.double().flatten(1).norm(p=norm, dim=1).max()) <= 1.0
