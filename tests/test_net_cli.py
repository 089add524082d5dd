"""The deployment CLI (typer app in hefl.cli.net): certs, split-data, status, config errors."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from hefl.cli.net import app
from hefl.net.config import load_config
from hefl.net.store import Store
from hefl.rounds import RoundRecord

runner = CliRunner()


def test_certs_and_split_data(tmp_path):
    r = runner.invoke(app, ["certs", "--out", str(tmp_path / "c"), "--clients", "alice,bob"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "clients" / "bob.token").exists()
    r = runner.invoke(app, ["certs", "--out", str(tmp_path / "c"), "--clients", "alice"])
    assert r.exit_code == 2 and "already holds a CA" in r.output
    r = runner.invoke(app, ["split-data", "--out", str(tmp_path / "d"), "--clients", "alice,bob"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "d" / "alice.npz") as a, np.load(tmp_path / "d" / "bob.npz") as b:
        assert len(a["y"]) + len(b["y"]) == 1437  # the W1 train split


def test_status_shows_rounds_participants_metrics_and_writes_plot(tmp_path):
    s = Store(tmp_path)
    s.open_run("demo-1", {"rounds": 2}, rounds=2, initial=np.zeros(3), opt_state=b"")
    s.register_clients("demo-1", [("alice", False), ("bob", True)])
    s.client_event("demo-1", "alice", "joined")
    s.commit_round("demo-1", RoundRecord(1, 2, 1, 5.0, 0.7, {"test_accuracy": 0.5},
                                         {"bob": "revoked"}), np.ones(3), b"")
    s.close()
    r = runner.invoke(app, ["status", "--state", str(tmp_path), "--plot", str(tmp_path / "p.png"),
                            "--metrics", str(tmp_path / "m.jsonl")])
    assert r.exit_code == 0, r.output
    assert "demo-1: running, 1/2 rounds" in r.output
    assert "round 1: 1/2 clients train_loss=0.7000 test_accuracy=0.5000; bob: revoked" in r.output
    assert "bob (revoked): -, never seen" in r.output
    assert "alice: joined, 20" in r.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0]["round"] == 1 and rows[0]["metrics"]["test_accuracy"] == 0.5
    r = runner.invoke(app, ["status", "--state", str(tmp_path), "--json"])
    info = json.loads(r.output)
    assert info["runs"][0]["per_round"][0]["contributors"] == 1
    r = runner.invoke(app, ["status", "--state", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no hefl state" in r.output


def test_config_errors_say_what_to_do(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nrounds = 2\n[clients]\nregistry = "missing.toml"\n')
    r = runner.invoke(app, ["server", "--config", str(cfg)])
    assert r.exit_code == 2 and "run `hefl certs`" in r.output
    (tmp_path / "reg.toml").write_text('[[client]]\nname = "a"\ntoken_sha256 = "00"\n')
    cfg.write_text('[run]\nrounds = 2\n[clients]\nregistry = "reg.toml"\n')
    r = runner.invoke(app, ["server", "--config", str(cfg)])
    assert r.exit_code == 2 and "TLS is on by default" in r.output
    cfg.write_text('[run]\nrounds = 2\n[server]\nmin_clent = 2\n[clients]\nregistry = "reg.toml"\n'
                   "[tls]\ninsecure = true\n")
    r = runner.invoke(app, ["server", "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown key(s) ['min_clent'] in [server]" in r.output
    cfg.write_text('[run]\nrounds = 2\nclient_per_round = 1\n[clients]\nregistry = "reg.toml"\n'
                   "[tls]\ninsecure = true\n")
    r = runner.invoke(app, ["server", "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown key(s) ['client_per_round'] in [run]" in r.output
    cfg.write_text('[run]\nrounds = 2\n[server]\nmin_clients = 2\n[clients]\nregistry = "reg.toml"\n'
                   "[tls]\ninsecure = true\n")
    r = runner.invoke(app, ["server", "--config", str(cfg)])
    assert r.exit_code == 2 and "min_clients=2 can never be met" in r.output
    (tmp_path / "reg2.toml").write_text('[[client]]\nname = "a"\ntoken_sha256 = "00"\n'
                                        '[[client]]\nname = "b"\ntoken_sha256 = "00"\n'
                                        "revoked = true\n")
    cfg.write_text('[run]\nrounds = 2\n[server]\nmin_clients = 2\n'
                   '[clients]\nregistry = "reg2.toml"\n[tls]\ninsecure = true\n')
    r = runner.invoke(app, ["server", "--config", str(cfg)])
    assert r.exit_code == 2 and "1 of the 2 clients is revoked (b), leaving 1" in r.output
    cfg.write_text('[run]\nrounds = 2\n[clients]\nregistry = "reg.toml"\n[tls]\ninsecure = true\n')
    c = load_config(cfg)
    assert c.clients[0].name == "a" and c.state_dir == tmp_path / "state"
    same = load_config(cfg)
    assert same.run_id == c.run_id  # a restart with the same file resumes the same run


def test_keys_ceremony_files_and_custody_hints(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nkind = "logreg"\nn_features = 8\nn_classes = 2\n'
                   '[aggregation]\nkind = "bfv"\ncustody = "keyholder"\n')
    r = runner.invoke(app, ["keys", "--config", str(cfg), "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert "only the key holder" in r.output and "never give it share.key" in r.output
    assert "--registry" in r.output  # the key holder verifies signatures against its own copy
    share = tmp_path / "k" / "share.key"
    assert (share.stat().st_mode & 0o777) == 0o600
    from hefl.crypto import KeyShare, PublicContext

    assert KeyShare.from_bytes(share.read_bytes()).spec.size == 9
    public = PublicContext.from_bytes((tmp_path / "k" / "public.ctx").read_bytes())
    assert public.public_key  # custody keyholder: clients encrypt with the public key
    r = runner.invoke(app, ["keys", "--config", str(cfg), "--out", str(tmp_path / "k")])
    assert r.exit_code == 2 and "already holds keys" in r.output
    cfg.write_text('[model]\nkind = "logreg"\nn_features = 8\n[aggregation]\nkind = "plain"\n')
    r = runner.invoke(app, ["keys", "--config", str(cfg), "--out", str(tmp_path / "k2")])
    assert r.exit_code == 2 and "only for encrypted aggregation" in r.output


def test_client_gives_up_when_no_server_answers(tmp_path):
    from hefl.data.federated import ClientData
    from hefl.net.data import save_client_data
    from hefl.net.testing import free_port

    data = save_client_data(tmp_path / "a.npz", ClientData(np.zeros((2, 3)), np.zeros(2)))
    r = runner.invoke(app, ["client", "--server", f"127.0.0.1:{free_port()}", "--data", str(data),
                            "--token", "alice:" + "s" * 20, "--insecure",
                            "--give-up-after", "0.5"])
    assert r.exit_code == 2 and "could not reach the server" in r.output
    r = runner.invoke(app, ["client", "--server", "127.0.0.1:1", "--data", str(data),
                            "--token", "not-a-token", "--insecure"])
    assert r.exit_code == 2 and "malformed token" in r.output
