"""hefl certs: a CA, a server certificate valid for the hosts asked, client certificates,
private files 0600, tokens whose hashes (never the tokens) are in the registry."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hefl.errors import ConfigError
from hefl.net.certs import make_federation
from hefl.net.config import load_registry
from hefl.net.wire import Token


def test_federation_files(tmp_path):
    fed = make_federation(tmp_path, ["alice", "bob"], hosts=["fl.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(fed.ca.read_bytes())
    srv = x509.load_pem_x509_certificate(fed.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    cert, key = fed.client_cert("bob")
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    c.verify_directly_issued_by(ca)
    assert c.subject.rfc4514_string().startswith("CN=bob")
    for private in [tmp_path / "ca.key", fed.server_key, key, fed.token("alice")]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    registry = load_registry(fed.registry)
    assert [e.name for e in registry] == ["alice", "bob"]
    tok = Token.parse(fed.token("alice").read_text())
    assert registry[0].token_sha256 == tok.sha256
    assert tok.secret not in fed.registry.read_text()


def test_refuses_to_overwrite_and_bad_names(tmp_path):
    make_federation(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="already holds a CA"):
        make_federation(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="client name"):
        make_federation(tmp_path / "x", ["bad name"])
    with pytest.raises(ConfigError, match="at least one client"):
        make_federation(tmp_path / "y", [])
