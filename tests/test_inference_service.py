"""Serving over HTTPS and the `hefl infer` CLI: score == plaintext, bad input, resume."""

import csv
import json
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from hefl.cli.infer import app
from hefl.crypto.scoring import MLP_PARAMS, Keyring
from hefl.data.tabular import read_csv
from hefl.errors import ConfigError, ContextMismatch, DataError, Refused, TransportError
from hefl.inference.bench import BENCH_KEYS, fit_logistic
from hefl.inference.server import make_server
from hefl.inference.service import ScoringClient, ScoringService, score_csv
from hefl.inference.wire import Batch
from hefl.net.certs import make_federation


def _csv(path, n, seed=0, with_target=True, extra_category=False):
    rng = np.random.default_rng(seed)
    cats = ["a", "b", "c"] + (["zzz"] if extra_category else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["age", "income", "kind"] + (["y"] if with_target else []))
        for _ in range(n):
            age, inc, k = rng.integers(18, 90), rng.normal(1000, 300), rng.choice(cats)
            logit = 0.05 * (age - 50) + 0.004 * (inc - 1000) + (k == "b") + rng.normal()
            w.writerow([age, f"{inc:.2f}", k] + (["yes" if logit > 0 else "no"]
                                                  if with_target else []))
    return path


def start(service, d, **kw):
    """A scoring server on a free port for callers bank-a and bank-b (certs from hefl certs)."""
    fed = make_federation(d / "certs", ["bank-a", "bank-b"])
    server = make_server(service, fed.server_cert, fed.server_key, fed.registry, port=0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}", fed


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    train = read_csv(_csv(d / "train.csv", 400))
    mf = fit_logistic(train, target="y")
    model_path = mf.save(d / "model.json")
    server, url, fed = start(ScoringService(mf, publish_preprocessing=True), d)
    yield {"dir": d, "mf": mf, "model": model_path, "cert": fed.ca, "url": url, "fed": fed,
           "token": fed.token("bank-a")}
    server.shutdown()
    server.server_close()


def _client(served, **kw):
    return ScoringClient(served["url"], served["cert"], token_file=served["token"], **kw)


def _read_scores(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["row"]) for r in rows]), np.array([float(r["logit"]) for r in rows])


def test_score_csv_over_https_equals_plaintext(served, tmp_path):
    data = _csv(tmp_path / "new.csv", 150, seed=1, with_target=False)
    out = tmp_path / "scores.csv"
    s = score_csv(_client(served), data, out, batch_size=64)
    assert (s.scored, s.batches) == (150, 3)
    rows, z = _read_scores(out)
    x = served["mf"].preprocessing.transform(read_csv(data))
    assert rows.tolist() == list(range(150))
    np.testing.assert_allclose(z, served["mf"].model.logits(x), atol=1e-5)


def test_cli_score_and_unknown_category_warning(served, tmp_path):
    data = _csv(tmp_path / "new.csv", 30, seed=2, with_target=False, extra_category=True)
    out = tmp_path / "s.csv"
    args = ["--url", served["url"], "--ca", str(served["cert"]), "--token-file",
            str(served["token"])]
    r = CliRunner().invoke(app, ["score", "--data", str(data), "--out", str(out), *args])
    assert r.exit_code == 0, r.output
    assert "not seen in training" in r.output and "scored 30 rows" in r.output
    rows, z = _read_scores(out)
    x = served["mf"].preprocessing.transform(read_csv(data))
    np.testing.assert_allclose(z, served["mf"].model.logits(x), atol=1e-5)
    again = CliRunner().invoke(app, ["score", "--data", str(data), "--out", str(out), *args])
    assert again.exit_code == 2 and "--resume" in again.output  # never overwrites scores


class _FailingClient(ScoringClient):
    """Fails after ``ok`` batches, like a dropped connection."""

    def __init__(self, served, ok):
        super().__init__(served["url"], served["cert"], token_file=served["token"])
        self.ok = ok

    def score(self, session, batch):
        if self.ok == 0:
            raise TransportError("connection reset")
        self.ok -= 1
        return super().score(session, batch)


def test_interrupted_scoring_keeps_done_batches_and_resumes(served, tmp_path):
    data = _csv(tmp_path / "new.csv", 50, seed=3, with_target=False)
    out = tmp_path / "s.csv"
    with pytest.raises(TransportError):
        score_csv(_FailingClient(served, ok=2), data, out, batch_size=20)
    rows, _ = _read_scores(out)
    assert rows.tolist() == list(range(40))  # two full batches are on disk
    s = score_csv(_client(served), data, out, batch_size=20,
                  resume=True)
    assert (s.skipped, s.scored) == (40, 10)
    rows, z = _read_scores(out)
    x = served["mf"].preprocessing.transform(read_csv(data))
    assert rows.tolist() == list(range(50))
    np.testing.assert_allclose(z, served["mf"].model.logits(x), atol=1e-5)


def test_bad_csv_fails_before_anything_is_sent(served, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("age,kind\n30,a\n")
    with pytest.raises(DataError, match="lacks columns the model needs: income"):
        score_csv(_client(served), bad, tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_server_refuses_foreign_ciphertexts_and_sessions(served):
    client = _client(served)
    info = client.info()
    assert info["kind"] == "logistic" and info["preprocessing"]["target"] == "y"
    mine = Keyring.generate(ScoringService(served["mf"]).params)
    session = client.open_session(mine.evaluation_keys())
    x = np.zeros((3, info["n_features"]))
    other = Keyring.generate(mine.params)  # same parameters, another secret key
    with pytest.raises(ContextMismatch, match="encrypted under key"):
        client.score(session, Batch(other.key_id, 3, tuple(other.encrypt_batch(x))))
    mlp = Keyring.generate(MLP_PARAMS, relin=True)  # other parameters, forged key id
    with pytest.raises(ContextMismatch, match="other parameters"):
        client.score(session, Batch(mine.key_id, 3, tuple(mlp.encrypt_batch(x[:, :1]))))
    with pytest.raises(Refused, match="TOO_LARGE: .* exceeds this model's limit"):
        client.score(session, Batch(mine.key_id, 3, tuple(mlp.encrypt_batch(x))))
    with pytest.raises(ContextMismatch, match="this model needs"):
        client.open_session(mlp.evaluation_keys())
    with pytest.raises(ConfigError, match="unknown or expired session"):
        client.score("0" * 32, Batch(mine.key_id, 3, tuple(mine.encrypt_batch(x))))
    with pytest.raises(TransportError, match="bad magic"):
        client._request("POST", f"/v1/sessions/{session}/score", b"garbage")
    ok = client.score(session, Batch(mine.key_id, 3, tuple(mine.encrypt_batch(x))))
    np.testing.assert_allclose(mine.decrypt_scores(ok.blobs[0], 3),
                               served["mf"].model.intercept, atol=1e-6)


def test_untrusted_certificate_is_refused(served):
    with pytest.raises(TransportError, match="certificate"):
        # the system CAs do not trust the federation's own CA
        ScoringClient(served["url"], token_file=served["token"]).info()


def test_cli_bench_json_keys_and_serve_needs_a_certificate(tmp_path):
    data = _csv(tmp_path / "d.csv", 300, seed=4)
    r = CliRunner().invoke(app, ["bench", "--csv", str(data), "--target", "y", "--json",
                                 "--save-model", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert tuple(res) == BENCH_KEYS
    assert res["rows"] == 300 and res["features"] == 5
    assert res["accuracy_encrypted"] == res["accuracy_plain"]
    assert abs(res["auc_encrypted"] - res["auc_plain"]) < 1e-9
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "--clients FILE" in r.output
    fed = make_federation(tmp_path / "certs", ["bank-a"])
    r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m.json"),
                                 "--clients", str(fed.registry)])
    assert r.exit_code == 2 and "--self-signed" in r.output
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m.json"), "--port", port,
                                     "--self-signed", str(tmp_path / "c"),
                                     "--clients", str(fed.registry)])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output
    assert "--port 0 for any free port" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["bench", "--csv", str(data), "--target", "nope"])
    assert r.exit_code == 2 and "target column 'nope'" in r.output


def test_mlp_model_served_with_relin_keys_uploaded_once(tmp_path):
    from hefl.inference.mlp import train_poly_mlp
    from hefl.inference.model import ModelFile

    train = read_csv(_csv(tmp_path / "train.csv", 300, seed=5))
    pre = fit_logistic(train, target="y").preprocessing
    mlp = train_poly_mlp(pre.transform(train), pre.labels(train), hidden=4, epochs=5)
    mf = ModelFile(mlp, pre)
    server, url, fed = start(ScoringService(mf), tmp_path)
    try:
        client = ScoringClient(url, fed.ca, token_file=fed.token("bank-b"))
        assert client.info()["needs_relin_keys"] is True
        assert "preprocessing" not in client.info()  # not published unless configured
        data = _csv(tmp_path / "new.csv", 40, seed=6, with_target=False)
        out = tmp_path / "s.csv"
        with pytest.raises(ConfigError, match="--preprocessing FILE"):
            score_csv(client, data, out, batch_size=16)
        s = score_csv(client, data, out, batch_size=16, preprocessing=pre)
        assert s.batches == 3
        _, z = _read_scores(out)
        ref = mlp.logits(pre.transform(read_csv(data)))
        np.testing.assert_allclose(z, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
    finally:
        server.shutdown()
        server.server_close()


def test_resume_cuts_a_torn_last_line_and_refuses_another_file(served, tmp_path):
    data = _csv(tmp_path / "new.csv", 30, seed=7, with_target=False)
    out = tmp_path / "s.csv"
    client = _client(served)
    score_csv(client, data, out, batch_size=10)
    text = out.read_text().splitlines()
    out.write_text("\n".join(text[:21]) + "\n20,0.12")  # crash in the middle of row 20
    s = score_csv(client, data, out, batch_size=10, resume=True)
    assert (s.skipped, s.scored) == (20, 10)
    rows, z = _read_scores(out)
    assert rows.tolist() == list(range(30))
    x = served["mf"].preprocessing.transform(read_csv(data))
    np.testing.assert_allclose(z, served["mf"].model.logits(x), atol=1e-5)
    small = _csv(tmp_path / "small.csv", 5, seed=8, with_target=False)
    with pytest.raises(DataError, match="another data file"):
        score_csv(client, small, out, resume=True)
