"""Throwaway certificates for trying split training across processes: a CA, a server and one per client.

For experiments on one machine or a lab network only. A real deployment gets its certificates from the
organisations' own PKI; nothing here is fit for that.

Directories written to DIR, one per holder: ``DIR/ca/`` (``ca.pem`` + ``ca.key``: the CA key, which signs
certificates, stays with whoever ran ``splitleak certs`` and is handed to nobody), ``DIR/server/``
(``ca.pem``, ``server.pem``, ``server.key``), ``DIR/client-<i>/`` (``ca.pem``, ``client-<i>.pem``,
``client-<i>.key``) and, with ``--stages S``, ``DIR/stage-<i>/`` for each pipeline stage (a certificate valid
as server and client, whose names include ``stage-<i>``, which its upstream neighbour checks): each party gets only its own directory, with its own key and no other. Private keys are
0600, the directories 0700. The server accepts only clients whose certificate the CA signed, and takes a
client's identity from its certificate's common name (``client-<i>``), never from what the client claims.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from suite.errors import SplitleakError


def client_name(client_id: int) -> str:
    return f"client-{client_id}"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitleak throwaway"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write atomically; a private key's file is created with mode 0600 from the start (never written first
    and restricted afterwards), and never through a file or link that was already there."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def stage_name(index: int) -> str:
    """The certificate identity of pipeline stage ``index`` (``splitleak serve --stage``)."""
    return f"stage-{index}"


def _issue(cn: str, key, ca_name: x509.Name, ca_key, *, server: bool, hosts: tuple[str, ...], days: int,
           stage: bool = False):
    """A server certificate is valid for ``hosts``; a stage's serves its upstream neighbour and calls its
    downstream one, so it is both a server (valid for ``hosts`` and its own name, which the upstream stage
    checks) and a client."""
    now = dt.datetime.now(dt.UTC)
    server = server or stage
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                                                    if stage else [ExtendedKeyUsageOID.SERVER_AUTH if server
                                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(cn)] if stage else []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_certs(out: str | Path, clients: int, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
               days: int = 30, stages: int = 0) -> Path:
    """Write a fresh CA to ``out/ca``, a server certificate for ``hosts`` to ``out/server``, ``clients``
    client certificates to ``out/client-<i>`` and ``stages`` pipeline stage certificates to ``out/stage-<i>``
    (see the module docstring); returns ``out``."""
    if clients < 1:
        raise SplitleakError("certs: --clients must be at least 1")
    if stages < 0 or stages == 1:
        raise SplitleakError(f"certs: --stages must be 0 (none) or at least 2, not {stages} (one stage is the server)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def own_dir(name: str) -> Path:
        d = out / name
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    ca_key = _key()
    ca_name = _name("splitleak throwaway CA")
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write(own_dir("ca") / "ca.pem", ca_pem)
    _write(out / "ca" / "ca.key", _pem_key(ca_key), private=True)
    parties = [("server", True)] + [(client_name(i), False) for i in range(clients)]
    for cn, server in parties + [(stage_name(i), True) for i in range(stages)]:
        key = _key()
        cert = _issue(cn, key, ca_name, ca_key, server=server, hosts=hosts, days=days, stage=cn.startswith("stage-"))
        party = own_dir(cn)
        _write(party / "ca.pem", ca_pem)
        _write(party / f"{cn}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(party / f"{cn}.key", _pem_key(key), private=True)
    return out


@dataclass(frozen=True)
class Identity:
    """The PEM bytes one party presents and trusts."""

    ca: bytes
    cert: bytes
    key: bytes


def load_identity(certs: str | Path, name: str) -> Identity:
    """``name`` is ``"server"``, ``client-<i>`` or ``stage-<i>``; ``certs`` is that party's own directory (``DIR/<name>``
    of ``splitleak certs DIR``), or DIR itself when every party runs on the machine that made them. A missing
    file, or a directory that also holds another private key (the CA's, another party's: the old flat
    layout), is a one-line error naming the fix."""
    certs = Path(certs)
    if (certs / name).is_dir():
        certs = certs / name
    paths = [certs / "ca.pem", certs / f"{name}.pem", certs / f"{name}.key"]
    for p in paths:
        if not p.is_file():
            raise SplitleakError(f"missing certificate file {p}; create throwaway ones with "
                                 f"`splitleak certs DIR --clients N` and pass DIR/{name}")
    others = sorted(p.name for p in certs.glob("*.key") if p.name != f"{name}.key")
    if others:
        raise SplitleakError(f"{certs} holds private keys that are not {name}'s ({', '.join(others)}): each party "
                             f"must get only its own; recreate them with `splitleak certs DIR --clients N` and pass "
                             f"DIR/{name} (the CA key stays in DIR/ca)")
    return Identity(*(p.read_bytes() for p in paths))
