"""Defenses in the networked mode: which one a process runs, what both sides agree on, and the refusals.

``splitleak serve`` and ``splitleak client`` take ``--defense NAME --defense-param k=v`` (as ``attack`` does),
or the config's ``[matrix] defenses`` when it names exactly one. Each side installs its own part
(``Defense.install_server`` / ``Defense.install_client``): the client its noise, bottleneck, sanitisation and
detectors (the integrity audit's verifier on its own replica), the server its commitments and the bounds the
defense's public parameters imply (``Defense.server_bounds``). The name and the public parameters enter the
config hash both sides must present (``suite.net.parties.config_hash``); a client and a server started with
different ones are refused at Hello in one line.

What the hash is not: an attestation. Each process installs what its own command line says; the other side
cannot see whether it did (a client's noise is secret by design). The hash catches two sides configured
differently by mistake. A server that agreed to the audit but does not commit is caught by the client's
verifier on every step, and one that does not reveal on every step a reveal is asked for; a client that agreed to noise and sends none harms only its
own privacy.
"""

from __future__ import annotations

import json
from typing import Any

from suite.errors import SplitleakError


def choose_defense(cfg, name: str | None = None, params: dict[str, Any] | None = None):
    """The defense this process runs: ``name`` (``--defense``) with ``params``, else the config's single
    ``[matrix] defenses`` entry, else ``none``. Refused in one line: a fixed ``seed`` (the server holds the
    config and could regenerate the noise), a defense the networked mode cannot provide (``network_refusal``),
    and anything ``make_defense`` refuses."""
    from suite.interfaces.defense import make_defense

    if name is None:
        entries = list(cfg.matrix.defenses)
        entry = entries[0] if len(entries) == 1 else "none"
        if isinstance(entry, dict):
            name, params = entry.get("name", "?"), {k: v for k, v in entry.items() if k != "name"}
        else:
            name, params = entry, {}
    params = dict(params or {})
    if params.get("seed") is not None:
        raise SplitleakError(f"defense {name!r}: --defense-param seed fixes its noise, which lets the server "
                             "regenerate it: leave 'seed' out (it is for tests only)")
    defense = make_defense(name, params)
    if defense.network_refusal:
        raise SplitleakError(f"defense {name!r} cannot run in serve/client: {defense.network_refusal}")
    return defense


def describe(defense) -> dict[str, Any]:
    """What both sides agree on: the name and the public parameters (never ``secret_fields``), each of its
    field's declared type (``make_defense`` converts: ``sigma=1`` and ``sigma=1.0``, ``freeze=0`` and
    ``freeze=false`` are one setting) with derived defaults filled in (DP's ``grad_clip`` = ``clip``)."""
    import dataclasses

    floats = {f.name for f in dataclasses.fields(defense.config) if "float" in str(f.type)}
    params = {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v
              for k, v in defense.public_params().items()}
    return {"name": defense.name, "params": params}


def label(defense) -> str:
    """One line for messages: ``dp_gaussian(clip=1.0, sigma=0.5, ...)``."""
    return described_label(describe(defense))


def described_label(described: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(described["params"].items()))
    return f"{described['name']}({params})" if params else described["name"]


def key_exchange(described: dict[str, Any]) -> str:
    """The link always seals every message with AES-256-GCM inside TLS; ``encryption`` picks the key exchange
    (its ``mode``), every other defense the default X25519. ``described``: ``describe(defense)``."""
    return described["params"].get("mode", "x25519") if described["name"] == "encryption" else "x25519"
