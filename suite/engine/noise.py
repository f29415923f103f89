"""Deployment noise from a cryptographic keystream: the one source every defense's client-side randomness
comes from.

Why not ``torch.Generator``: it keeps only the low 32 bits of its seed and its stream (MT19937) is not a
cryptographic generator, so a server that sees noisy activations can search the 2^32 seeds, regenerate the
noise bit for bit and subtract it. A ``NoiseStream`` is ChaCha20 (from ``cryptography``) keyed with 32 bytes
from ``os.urandom``, fresh per client and per run; nothing about the key crosses the wire or sits in the
config, so knowing every public parameter and every earlier output says nothing of the next draw.

Samplers (all computed in float64 from 52-bit uniforms on the open interval (0, 1), so no logarithm ever sees
0 or 1 and no sample is infinite):

* ``uniform``: (k + 1/2) / 2^52 for a 52-bit keystream word k: exact in float64, in [2^-53, 1 - 2^-53];
* ``normal``: Box–Muller, both halves used;
* ``exponential``: −log(u), so at most 53·ln 2 ≈ 36.7 (the support is bounded: ``defenses.dp`` accounts
  for that);
* ``laplace``: a keystream sign bit times an exponential;
* ``categorical``: inverse CDF over each row of a probability table.

One ChaCha20 key serves many sub-streams (the 96-bit nonce counts them): each carries at most 2^36 bytes,
far below the 2^32 blocks (256 GiB) after which ChaCha20's block counter would wrap, so a long run never
reuses keystream.

``NoiseStream.for_tests(seed, *labels)`` derives the key from an integer (sha256), for reproducible tests
only: anyone who knows the seed can regenerate the noise, so ``splitleak serve`` / ``client`` refuse it.
``NoiseStream.from_generator(generator)`` keys a stream from an attacker's own seeded ``torch.Generator``
(a knowing attacker simulating a defense on its shadow data: reproducible, and never the clients' key).
"""

from __future__ import annotations

import hashlib
import math
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_MASK52 = (1 << 52) - 1
SUBSTREAM_BYTES = 2**36  # keystream bytes per nonce (ChaCha20's 32-bit block counter allows 2^38)


class NoiseStream:
    """Samples drawn from a ChaCha20 keystream. Not thread-safe: one stream per client (or per hook)."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError(f"a NoiseStream key is 32 bytes, got {len(key)}")
        self._key = key
        self._substream = -1
        self._left = 0  # bytes left in the current sub-stream
        self._keystream = None
        self.drawn = 0  # keystream bytes consumed (for tests and accounting)
        self.source = "os_random"

    @classmethod
    def fresh(cls) -> NoiseStream:
        """A stream keyed from the operating system's CSPRNG: the only kind fit for a deployment."""
        return cls(os.urandom(32))

    @classmethod
    def for_tests(cls, seed: int, *labels: object) -> NoiseStream:
        """A reproducible stream derived from ``seed`` (and labels such as the client id). UNSAFE."""
        stream = cls(hashlib.sha256(repr(("splitleak UNSAFE test seed", int(seed), labels)).encode()).digest())
        stream.source = "fixed_seed_UNSAFE"
        return stream

    @classmethod
    def from_generator(cls, generator: torch.Generator) -> NoiseStream:
        """A stream keyed from 32 bytes of ``generator`` (an attacker's own reproducible randomness)."""
        key = torch.randint(0, 256, (32,), generator=generator, dtype=torch.int64)
        stream = cls(bytes(key.tolist()))
        stream.source = "attacker_generator"
        return stream

    # -- raw material ---------------------------------------------------------------------------------------

    def random_bytes(self, n: int) -> bytes:
        out = []
        while n > 0:
            if self._left == 0:  # the next sub-stream: a fresh nonce, its block counter from 0
                self._substream += 1
                nonce = bytes(4) + self._substream.to_bytes(12, "little")
                self._keystream = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
                self._left = SUBSTREAM_BYTES
            take = min(n, self._left)
            out.append(self._keystream.update(bytes(take)))
            self._left -= take
            self.drawn += take
            n -= take
        return b"".join(out)

    def _words(self, n: int) -> torch.Tensor:
        """``n`` 64-bit keystream words as int64."""
        if n == 0:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(self.random_bytes(8 * n)), dtype=torch.int64)

    # -- samplers (float64, on the host; callers cast and move) ---------------------------------------------

    def uniform(self, shape) -> torch.Tensor:
        """Uniform on the 2^52 points (k + 1/2) / 2^52 of the open interval (0, 1): never 0, never 1."""
        shape = torch.Size(shape)
        k = (self._words(shape.numel()) >> 12) & _MASK52  # the top 52 bits of each word
        return ((k.double() + 0.5) * 2.0**-52).view(shape)

    def normal(self, shape) -> torch.Tensor:
        """Standard normal (Box–Muller)."""
        shape = torch.Size(shape)
        n = shape.numel()
        half = (n + 1) // 2
        u = self.uniform((2, half))
        radius = torch.sqrt(-2.0 * torch.log(u[0]))
        angle = 2.0 * math.pi * u[1]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n].view(shape)

    def exponential(self, shape) -> torch.Tensor:
        """Standard exponential (rate 1): finite, since u < 1 strictly and u > 0 strictly."""
        return -torch.log(self.uniform(shape))

    def laplace(self, shape) -> torch.Tensor:
        """Standard Laplace (scale 1): a fair keystream sign times an exponential magnitude."""
        shape = torch.Size(shape)
        magnitude = self.exponential(shape)
        return torch.where(self.bits(shape), magnitude, -magnitude)

    def bits(self, shape) -> torch.Tensor:
        """Fair coin flips (bool), one keystream bit each."""
        shape = torch.Size(shape)
        n = shape.numel()
        packed = torch.frombuffer(bytearray(self.random_bytes((n + 7) // 8)), dtype=torch.uint8) if n else \
            torch.empty(0, dtype=torch.uint8)
        unpacked = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return unpacked.flatten()[:n].bool().view(shape)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of ``probs`` [N, V] (rows need not be normalised), by inverse CDF: [N] int64."""
        cdf = probs.double().cumsum(-1)
        target = self.uniform((probs.shape[0], 1)).to(cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def client_stream(seed: int | None, client_id: int) -> NoiseStream:
    """The stream a client draws its defense noise from. ``seed=None`` (the default, and the only setting fit
    for a deployment): keyed from ``os.urandom``, fresh per client and per run, so nobody who knows the config
    (the server does) can regenerate and subtract the noise. An integer ``seed`` makes runs reproducible for
    tests only and is UNSAFE (``splitleak serve`` / ``client`` refuse it)."""
    return NoiseStream.fresh() if seed is None else NoiseStream.for_tests(seed, client_id)


def as_stream(source: NoiseStream | torch.Generator) -> NoiseStream:
    """``source`` itself, or a stream keyed from an attacker's ``torch.Generator`` (its shadow simulation)."""
    return source if isinstance(source, NoiseStream) else NoiseStream.from_generator(source)
