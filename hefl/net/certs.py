"""Certificates and client tokens for a federation (a test CA; use your own PKI in production).

``make_federation(out, ["alice", "bob"])`` writes::

    out/ca.pem  out/ca.key                      the CA (keep ca.key offline)
    out/server.pem  out/server.key              server certificate (SANs: localhost, 127.0.0.1, ...)
    out/clients/NAME.pem  out/clients/NAME.key  client certificates (for mTLS)
    out/clients/NAME.token                      the client's secret token (give it to NAME only)
    out/clients/NAME.id                         its Ed25519 identity key: signs its contributions
    out/clients.toml                            the registry: names, token SHA-256, public
                                                identity keys (the server and every key holder
                                                get a copy; it holds no secret)

TLS keys are ECDSA P-256, identity keys Ed25519 (``hefl.net.identity``); private files are mode
0600. Built on the ``cryptography`` package; nothing
here implements a primitive.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hefl.errors import ConfigError
from hefl.net.files import ignore_secrets, write_private


@dataclass(frozen=True)
class Federation:
    """Paths written by ``make_federation``."""

    ca: Path
    server_cert: Path
    server_key: Path
    registry: Path
    client_dir: Path

    def token(self, name: str) -> Path:
        return self.client_dir / f"{name}.token"

    def identity(self, name: str) -> Path:
        return self.client_dir / f"{name}.id"

    def client_cert(self, name: str) -> tuple[Path, Path]:
        return self.client_dir / f"{name}.pem", self.client_dir / f"{name}.key"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hefl"),
         x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str = "hefl test CA", days: int = 365):
    """A self-signed CA: (private key, certificate)."""
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_key, ca_cert, common_name: str, *, server: bool, hosts: Sequence[str] = (),
          days: int = 365):
    """A leaf certificate signed by the CA: (private key, certificate).

    Args:
        server: server certificate (serverAuth, SANs from ``hosts``) or client (clientAuth).
        hosts: DNS names and IP addresses the server is reached at.
    """
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for h in hosts or ([common_name] if server else []):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if not server:
        sans.append(x509.DNSName(common_name))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


#: The secret files of a federation folder (kept out of git by its .gitignore).
SECRETS = ("ca.key", "server.key", "clients/*.key", "clients/*.token", "clients/*.id")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if private:
        write_private(path, data)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_token(name: str) -> str:
    """A fresh client token ``NAME:SECRET`` (256 random bits)."""
    return f"{name}:{secrets.token_urlsafe(32)}"


def make_federation(
    out: str | Path,
    clients: Sequence[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    overwrite: bool = False,
    key_holders: Sequence[str] = (),
) -> Federation:
    """Write a CA, a server certificate, client certificates, tokens and the registry.

    ``key_holders`` get a token and a certificate like clients, with ``role = "keyholder"`` in
    the registry (they decrypt aggregates in encrypted runs and are never sampled to train).

    Raises:
        ConfigError: no clients, a bad client name, or ``out`` already holds a CA (pass
            ``overwrite=True`` to replace it, or use ``add_parties``).
    """
    out = Path(out)
    if not clients:
        raise ConfigError("name at least one client, e.g. --clients alice,bob,carol")
    _check_names([*clients, *key_holders])
    if (out / "ca.pem").exists() and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds a CA; pass --add to add these parties to "
                          "its federation (nobody else's files change), or --overwrite to start "
                          "a new one (every certificate and token changes)")
    ca_key, ca_cert = make_ca(days=days)
    _write(out / "ca.pem", _pem_cert(ca_cert))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    s_key, s_cert = issue(ca_key, ca_cert, "hefl-server", server=True, hosts=hosts, days=days)
    _write(out / "server.pem", _pem_cert(s_cert))
    _write(out / "server.key", _pem_key(s_key), private=True)
    head = ("# hefl client registry: names (index order), token SHA-256 and public identity "
            "keys; no secrets.\n")
    entries = _issue_parties(out, ca_key, ca_cert, clients, key_holders, days)
    _write(out / "clients.toml", (head + entries).encode())
    ignore_secrets(out, SECRETS)
    return _federation(out)


def add_parties(out: str | Path, clients: Sequence[str] = (), key_holders: Sequence[str] = (),
                days: int = 365) -> Federation:
    """Add clients or key holders to the federation in ``out``: its CA signs their
    certificates, their registry entries are appended, and no existing file changes (every
    other party keeps its certificate, token and identity key).

    Adding a data client changes the run id of a config that uses this registry (the client
    names are part of it), so a running federation starts a new run; a key holder does not.

    Raises:
        ConfigError: no CA in ``out``, no names, a bad name, or a name already registered.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from hefl.net.config import load_registry

    out = Path(out)
    if not (out / "ca.pem").exists() or not (out / "ca.key").exists():
        raise ConfigError(f"{str(out)!r} holds no CA (ca.pem and ca.key) to add parties to; run "
                          "hefl certs without --add first")
    _check_names([*clients, *key_holders])
    if not (clients or key_holders):
        raise ConfigError("name the parties to add: --clients dave and/or --key-holders kh")
    taken = sorted({e.name for e in load_registry(out / "clients.toml")}
                   & {*clients, *key_holders})
    if taken:
        raise ConfigError(f"{', '.join(taken)} already registered in {str(out / 'clients.toml')!r}"
                          "; choose new names (to replace a party, revoke it and add a new one)")
    ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    ca_key = load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    entries = _issue_parties(out, ca_key, ca_cert, clients, key_holders, days)
    with (out / "clients.toml").open("a") as f:
        f.write(entries)
    ignore_secrets(out, SECRETS)
    return _federation(out)


def _check_names(everyone: Sequence[str]) -> None:
    from hefl.net.wire import NAME_RE

    for c in everyone:
        if not NAME_RE.match(c):
            raise ConfigError(f"client name {c!r} must be 1-64 letters, digits, '-' or '_'")
    if len(set(everyone)) != len(everyone):
        raise ConfigError("client names must be unique")


def _issue_parties(out: Path, ca_key, ca_cert, clients: Sequence[str],
                   key_holders: Sequence[str], days: int) -> str:
    """Certificate, key, token and identity files for each party; its registry entries."""
    from hefl.net.identity import Identity
    from hefl.net.wire import Token

    lines = []
    for name in [*clients, *key_holders]:
        role = "keyholder" if name in key_holders else "client"
        c_key, c_cert = issue(ca_key, ca_cert, name, server=False, days=days)
        _write(out / "clients" / f"{name}.pem", _pem_cert(c_cert))
        _write(out / "clients" / f"{name}.key", _pem_key(c_key), private=True)
        token = Token.parse(new_token(name))
        _write(out / "clients" / f"{name}.token", f"{token}\n".encode(), private=True)
        ident = Identity.generate()
        ident.save(out / "clients" / f"{name}.id")
        lines.append(f'\n[[client]]\nname = "{name}"\ntoken_sha256 = "{token.sha256}"\n'
                     f'revoked = false\nrole = "{role}"\nsign_key = "{ident.public_hex}"\n')
    return "".join(lines)


def _federation(out: Path) -> Federation:
    return Federation(out / "ca.pem", out / "server.pem", out / "server.key",
                      out / "clients.toml", out / "clients")
