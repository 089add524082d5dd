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


def test_adding_a_party_leaves_everyone_else_untouched(tmp_path):
    from typer.testing import CliRunner

    from hefl.cli.net import app

    fed = make_federation(tmp_path, ["alice", "bob"])
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = CliRunner().invoke(app, ["certs", "--out", str(tmp_path), "--add", "--key-holders", "kh",
                                 "--clients", "carol"])
    assert r.exit_code == 0, r.output
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"clients.toml"}  # appended to; every other file is byte-for-byte the same
    assert after["clients.toml"].startswith(before["clients.toml"])
    reg = {e.name: e for e in load_registry(fed.registry)}
    assert [reg[n].role for n in ("alice", "bob", "carol", "kh")] == ["client"] * 3 + ["keyholder"]
    assert reg["kh"].token_sha256 == Token.parse(fed.token("kh").read_text()).sha256
    ca = x509.load_pem_x509_certificate(fed.ca.read_bytes())
    x509.load_pem_x509_certificate(fed.client_cert("kh")[0].read_bytes()).verify_directly_issued_by(ca)
    assert stat.S_IMODE(fed.token("kh").stat().st_mode) == 0o600
    r = CliRunner().invoke(app, ["certs", "--out", str(tmp_path), "--add", "--clients", "bob"])
    assert r.exit_code == 2 and "bob already registered" in r.output
    r = CliRunner().invoke(app, ["certs", "--out", str(tmp_path), "--clients", "dave"])
    assert r.exit_code == 2 and "pass --add" in r.output
    r = CliRunner().invoke(app, ["certs", "--out", str(tmp_path / "none"), "--add", "--clients", "x"])
    assert r.exit_code == 2 and "holds no CA" in r.output


def test_secrets_are_kept_out_of_git(tmp_path):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    from hefl.net.files import write_private
    from hefl.net.keys import write_keys

    make_federation(tmp_path / "certs", ["alice"], key_holders=["kh"])
    write_keys({"kind": "bfv", "custody": "keyholder"}, 10, tmp_path / "keys")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    added = subprocess.run(["git", "-C", str(tmp_path), "add", "--dry-run", "-A"], check=True,
                           capture_output=True, text=True).stdout
    assert "certs/ca.pem" in added and "certs/clients.toml" in added and "keys/public.ctx" in added
    for secret in ("ca.key", "server.key", "alice.token", "alice.key", "alice.id", "kh.token",
                   "share.key"):
        assert secret not in added, secret
    old = tmp_path / "old.key"
    old.write_bytes(b"x")
    old.chmod(0o644)
    write_private(old, b"secret")  # an existing world-readable file is made owner-only
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 and old.read_bytes() == b"secret"
