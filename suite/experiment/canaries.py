"""Canaries (Carlini et al.'s secret sharer): secret-format records inserted into one victim's training data,
and the audit set the memorisation attacks are asked about.

Every canary reads ``CANARY_PREFIX + secret`` ("my account number is 4821-0093-7716"), the secret drawn
uniformly from ``[data] canaries.format`` (each ``#`` a decimal digit; the default ``SECRET_FORMAT`` has 10^12
secrets, ~39.9 bits; a 4-digit format's 10^4 can be ranked whole, exposure capped at 13.3 bits) with
``[data] canaries.seed``. ``count`` canaries are made for each value of ``repeats`` and each is inserted that
many times into the shard of the *canary victim*: the last client, a victim under every threat (a colluder
is client 0). The prefix and the format are public (they are the auditor's question); which secret each
canary holds is ground truth, handed to ``canary_exposure`` only as the canary texts it audits and never to
``extraction``, which gets the prefix alone.

Membership: the members are the canary victim's own training records (canaries left out), the
non-members the held-out records of the same kind (``data.held_out``, never trained on). The attacks get
them shuffled together, without labels (``AuditSet.queries``); the labels stay here for scoring.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from suite.errors import ConfigError
from suite.experiment.data import Record

CANARY_PREFIX = "my account number is "
SECRET_FORMAT = "####-####-####"


@dataclass(frozen=True)
class Canary:
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return CANARY_PREFIX + self.secret

    def record(self) -> Record:
        return Record(self.text, {"account": self.secret})


def random_secret(rng: random.Random, fmt: str = SECRET_FORMAT) -> str:
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in fmt)


def secret_format(canaries: list[Canary]) -> str:
    """The format the canaries' secrets were drawn from (digits as ``#``); ``SECRET_FORMAT`` when there are none."""
    return "".join("#" if ch.isdigit() else ch for ch in canaries[0].secret) if canaries else SECRET_FORMAT


def space_bits(fmt: str = SECRET_FORMAT) -> float:
    """log2 of the number of secrets of ``fmt``."""
    return fmt.count("#") * math.log2(10)


def make_canaries(count: int, repeats: list[int], seed: int, fmt: str = SECRET_FORMAT) -> list[Canary]:
    """``count`` canaries per repeat count, distinct secrets of ``fmt``, the same for the same seed in any
    process."""
    if count * len(repeats) > 10 ** fmt.count("#") // 2:
        raise ConfigError(f"{count * len(repeats)} canaries do not fit the secret format {fmt!r} "
                          f"({10 ** fmt.count('#'):,} secrets): use fewer canaries or more '#'")
    rng = random.Random(f"splitleak canaries {seed}")
    secrets: set[str] = set()
    out = []
    for r in repeats:
        for _ in range(count):
            s = random_secret(rng, fmt)
            while s in secrets:
                s = random_secret(rng, fmt)
            secrets.add(s)
            out.append(Canary(s, r))
    return out


def insert(shard: list[Record], canaries: list[Canary]) -> list[Record]:
    """The shard with every canary's record appended ``repeats`` times (the sampler shuffles every epoch)."""
    return [*shard, *(c.record() for c in canaries for _ in range(c.repeats))]


@dataclass(frozen=True)
class AuditSet:
    """What the memorisation attacks are asked about, and (for scoring only) the answers."""

    canaries: tuple[Canary, ...]
    queries: tuple[str, ...]  # members and non-members, shuffled: what ``membership`` scores
    is_member: tuple[bool, ...]  # ground truth of ``queries`` (never handed to an attack)


def audit_set(canaries: list[Canary], members: list[Record], non_members: list[Record], seed: int) -> AuditSet:
    pool = [(r.text, True) for r in members] + [(r.text, False) for r in non_members]
    random.Random(f"splitleak audit {seed}").shuffle(pool)
    return AuditSet(tuple(canaries), tuple(t for t, _ in pool), tuple(m for _, m in pool))
