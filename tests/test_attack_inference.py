"""Attacks on the encrypted-inference service (issue 14), each played over loopback HTTPS
against the real server: anonymous and forged callers, model extraction beyond a budget,
someone else's session, lying Content-Length headers, and floods of idle and slow
connections. Each asserts the attempt is refused and an honest caller is not held up."""

import http.client
import json
import os
import socket
import ssl
import threading
import time

import numpy as np
import pytest

from hefl.crypto.scoring import Keyring
from hefl.data.tabular import read_csv
from hefl.errors import ConfigError, QuotaExceeded, Refused
from hefl.inference.bench import fit_logistic
from hefl.inference.callers import Budget, Quotas
from hefl.inference.server import Limits, make_server
from hefl.inference.service import ScoringClient, ScoringService, score_csv
from hefl.inference.wire import Batch
from hefl.net.certs import make_federation


def _csv(path, n, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["age,income,kind,y"]
    for _ in range(n):
        age, inc, k = rng.integers(18, 90), rng.normal(1000, 300), rng.choice(["a", "b", "c"])
        y = "yes" if 0.05 * (age - 50) + 0.004 * (inc - 1000) + (k == "b") > 0 else "no"
        lines.append(f"{age},{inc:.2f},{k},{y}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return fit_logistic(read_csv(_csv(d / "train.csv", 300)), target="y")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("certs"), ["bank-a", "bank-b", "mallory"])


class Served:
    def __init__(self, model, fed, tmp_path, budget=Budget(), limits=None, client_ca=None,
                 publish=False, service_cls=ScoringService):
        self.clock = Clock()
        self.fed, self.ledger = fed, tmp_path / "usage.jsonl"
        self.quotas = Quotas(budget, ledger=self.ledger, clock=self.clock)
        self.service = service_cls(model, publish_preprocessing=publish)
        self.log = []
        self.server = make_server(self.service, fed.server_cert, fed.server_key, fed.registry,
                                  port=0, quotas=self.quotas, limits=limits,
                                  client_ca=client_ca, log=self.log.append)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self, name="bank-a", **kw):
        return ScoringClient(self.url, self.fed.ca, token_file=self.fed.token(name), **kw)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(model, fed, tmp_path):
    s = Served(model, fed, tmp_path)
    yield s
    s.close()


def _tls(port, ca, timeout=10):
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                           server_hostname="localhost")


def _raw(served, head: str, token: str | None = None, then_send: int = 0):
    """Send a hand-made request head and read the reply before sending any body; then try to
    push ``then_send`` bytes of junk. The status, headers and JSON reply."""
    if token is not None:
        head = head.replace("\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n", 1)
    with _tls(served.port, served.fed.ca) as s:
        s.sendall(head.encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        data = resp.read()
        try:
            for _ in range(then_send >> 20):
                s.sendall(b"\0" * (1 << 20))
        except OSError:
            pass  # the server closed the connection: the junk went nowhere
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else None


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def token(fed, name):
    return fed.token(name).read_text().strip()


# ------------------------------------------------------------------------- who may call


def test_anonymous_and_forged_callers_are_refused_before_anything_is_evaluated(served, model):
    """The review's extraction attack (one anonymous POST of chosen plaintexts) gets 401, as do
    a wrong secret and an unknown name; nothing is scored or charged."""
    fed = served.fed
    status, headers, err = _raw(served, "GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 401 and err["code"] == "UNAUTHENTICATED"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    name, secret = token(fed, "bank-a").split(":")
    for forged in (f"{name}:{'x' * len(secret)}", f"nobody:{secret}", "garbage"):
        status, _, err = _raw(served, "GET /v1/model HTTP/1.1\r\nHost: x\r\n\r\n", token=forged)
        assert status == 401, forged
    anon = ScoringClient(served.url, fed.ca)  # the attack: chosen plaintexts, no credentials
    keys = Keyring.generate(served.service.params)
    with pytest.raises(Refused, match="UNAUTHENTICATED"):
        anon.open_session(keys.evaluation_keys())
    x = np.eye(model.model.n_features)
    blobs = tuple(keys.encrypt_batch(x))
    with pytest.raises(Refused, match="UNAUTHENTICATED"):
        anon.score("0" * 32, Batch(keys.key_id, len(x), blobs))
    assert served.quotas.used("bank-a") == (0, 0) and not served.ledger.read_text()
    ok = served.client().info()
    assert ok["kind"] == "logistic"


def test_revocation_and_a_new_token_take_effect_without_a_restart(served, tmp_path):
    from hefl.net.wire import Token

    reg = served.fed.registry
    before = reg.read_text()
    old = Token.parse(token(served.fed, "bank-b"))
    client = served.client("bank-b")
    client.info()
    try:
        i = before.index('name = "bank-b"')
        j = before.index("revoked = false", i)
        reg.write_text(before[:j] + "revoked = true" + before[j + len("revoked = false"):])
        with pytest.raises(Refused, match="PERMISSION_DENIED: .*revoked"):
            client.info()
        served.client("bank-a").info()  # the others go on
        new = Token.parse("bank-b:" + "n" * 43)  # rotated: the old token stops working
        reg.write_text(before.replace(old.sha256, new.sha256))
        with pytest.raises(Refused, match="UNAUTHENTICATED"):
            client.info()
        assert ScoringClient(served.url, served.fed.ca, token=new).info()["kind"] == "logistic"
    finally:
        reg.write_text(before)
    client.info()


def test_mtls_requires_the_callers_own_certificate(model, fed, tmp_path):
    s = Served(model, fed, tmp_path, client_ca=fed.ca)
    try:
        own = s.client("bank-a", cert=fed.client_cert("bank-a")[0],
                       key=fed.client_cert("bank-a")[1])
        assert own.info()["kind"] == "logistic"
        stolen = s.client("bank-a", cert=fed.client_cert("mallory")[0],
                          key=fed.client_cert("mallory")[1])  # bank-a's token, mallory's cert
        with pytest.raises(Refused, match="PERMISSION_DENIED: .*does not belong to 'bank-a'"):
            stolen.info()
        with pytest.raises(Exception, match="failed"):  # no client certificate: no handshake
            s.client("bank-a").info()
    finally:
        s.close()


def test_model_endpoint_gives_feature_names_not_training_statistics(served, model, fed,
                                                                    tmp_path):
    info = served.client().info()
    assert info["features"] == list(model.preprocessing.feature_names)
    text = json.dumps(info)
    assert "preprocessing" not in info and '"mean"' not in text and '"std"' not in text
    for col in model.preprocessing.columns:  # not one training mean or sd is in the reply
        if col.kind == "numeric":
            assert f"{col.mean}"[:8] not in text and f"{col.std}"[:8] not in text
    published = Served(model, fed, tmp_path / "p", publish=True)
    try:
        assert published.client().info()["preprocessing"] == model.preprocessing.to_dict()
    finally:
        published.close()


def test_another_callers_session_is_unknown(served):
    a, b = served.client("bank-a"), served.client("bank-b")
    keys = Keyring.generate(served.service.params)
    sid = a.open_session(keys.evaluation_keys())
    batch = Batch(keys.key_id, 2, tuple(keys.encrypt_batch(np.zeros((2, 5)))))
    with pytest.raises(ConfigError, match="unknown or expired session"):
        b.score(sid, batch)
    b.close_session(sid)  # cannot close it either
    assert len(a.score(sid, batch).blobs) == 1


# ------------------------------------------------------------------------- budgets


def test_requests_per_minute_gives_429_and_the_next_minute_works(model, fed, tmp_path):
    s = Served(model, fed, tmp_path, budget=Budget(requests_per_minute=3))
    try:
        s.clock.t = 60 * (s.clock.t // 60) + 15  # 45 s left in this minute
        c = s.client()
        for _ in range(3):
            c.info()
        with pytest.raises(QuotaExceeded, match="requests_per_minute") as e:
            c.info()
        assert e.value.retry_after_s == 45
        s.client("bank-b").info()  # another caller's budget is its own
        s.clock.t += 45
        assert c.info()["kind"] == "logistic"
        assert any("429" in m and "bank-a" in m for m in s.log)
        assert '"limit": "requests_per_minute"' in s.ledger.read_text()
    finally:
        s.close()


def test_records_per_day_counts_every_slot_survives_a_restart_and_resets_next_day(
        model, fed, tmp_path):
    cap = ScoringService(model).params.records_per_ciphertext
    s = Served(model, fed, tmp_path, budget=Budget(records_per_day=2 * cap))
    keys = Keyring.generate(s.service.params)
    x = np.random.default_rng(0).normal(size=(cap, 5))
    try:
        c = s.client()
        sid = c.open_session(keys.evaluation_keys())
        full = Batch(keys.key_id, cap, tuple(keys.encrypt_batch(x)))
        c.score(sid, full)
        # declaring 1 record while filling every slot is charged every slot: the server
        # cannot see how many a ciphertext holds, and each comes back scored
        lying = Batch(keys.key_id, 1, tuple(keys.encrypt_batch(x[:1])))
        assert s.service.charge_for(lying) >= cap // 8
        c.score(sid, Batch(keys.key_id, cap, tuple(keys.encrypt_batch(x))))
        assert s.quotas.used("bank-a")[1] == 2 * cap
        with pytest.raises(QuotaExceeded, match="records_per_day") as e:
            c.score(sid, full)
        assert 0 < e.value.retry_after_s <= 86400
    finally:
        s.close()
    again = Served(model, fed, tmp_path, budget=Budget(records_per_day=2 * cap))  # restart
    try:
        again.clock.t = s.clock.t
        c = again.client()
        sid = c.open_session(keys.evaluation_keys())
        with pytest.raises(QuotaExceeded, match="has scored 8192 of its 8192"):
            c.score(sid, full)
        again.clock.t += e.value.retry_after_s  # UTC midnight
        out = c.score(sid, full)
        z = keys.decrypt_scores(out.blobs[0], cap)
        np.testing.assert_allclose(z, model.model.logits(x), atol=1e-4)
    finally:
        again.close()
    rows = [json.loads(line) for line in s.ledger.read_text().splitlines()]
    assert [r["records"] for r in rows if r["event"] == "score"] == [cap, cap, cap]
    assert oct(os.stat(s.ledger).st_mode & 0o777) == "0o600"


# ------------------------------------------------------------------------- lying bodies


@pytest.mark.parametrize("header,status", [
    ("Content-Length: -1\r\n", 400),
    ("", 411),
    ("Content-Length: 1099511627776\r\n", 413),
    ("Content-Length: 12, 12\r\n", 400),
    ("Transfer-Encoding: chunked\r\n", 411),
    ("Content-Length: " + "9" * 5000 + "\r\n", 413),  # past int()'s digit limit
])
def test_bad_content_length_is_refused_without_reading_the_body(served, header, status):
    head = f"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n{header}\r\n"
    rss = _rss_mib()
    t0 = time.monotonic()
    # no body is sent at all: the reply cannot have waited for one
    got, _, err = _raw(served, head, token=token(served.fed, "bank-a"))
    assert got == status, err
    assert time.monotonic() - t0 < 5
    # the review's attack: -1 then 32 MiB of junk; the reply comes, the junk is not kept
    if "-1" in header:
        got, _, _ = _raw(served, head, token=token(served.fed, "bank-a"), then_send=32 << 20)
        assert got == 400
        assert _rss_mib() - rss < 24
    # without a valid token, authentication fails first: nothing about the body is looked at
    got, _, _ = _raw(served, head)
    assert got == 401


# ------------------------------------------------------------------------- floods


def _honest(served, data, out):
    t0 = time.monotonic()
    s = score_csv(served.client("bank-b"), data, out, batch_size=100,
                  preprocessing=served.service.model_file.preprocessing)
    assert s.scored == 300
    return time.monotonic() - t0


def test_idle_and_slow_connections_do_not_stop_an_honest_caller(served, tmp_path):
    data = _csv(tmp_path / "new.csv", 300, seed=1)
    base = min(_honest(served, data, tmp_path / f"b{i}.csv") for i in range(2))
    rss = _rss_mib()
    idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(50)]
    slow = []
    for _ in range(10):  # handshake done, then one header byte now and then
        s = _tls(served.port, served.fed.ca)
        s.sendall(b"GET /v1/model HTTP/1.1\r\n")
        slow.append(s)
    try:
        took = _honest(served, data, tmp_path / "during.csv")
        assert took <= base + 1.0, (took, base)
        assert _rss_mib() - rss < 32
    finally:
        for s in idle + slow:
            s.close()


def test_a_slow_client_is_cut_off_at_its_deadline(model, fed, tmp_path):
    s = Served(model, fed, tmp_path, limits=Limits(handshake_timeout_s=0.5,
                                                   header_timeout_s=0.5))
    try:
        idle = socket.create_connection(("127.0.0.1", s.port))
        conn = _tls(s.port, fed.ca)
        t0 = time.monotonic()
        conn.sendall(b"GET /v1/model HTTP/1.1\r\n")
        closed = None
        while time.monotonic() - t0 < 10:
            try:
                conn.sendall(b"X")
                conn.settimeout(0.2)
                if conn.recv(1) == b"":
                    closed = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                closed = time.monotonic() - t0
                break
        assert closed is not None and closed < 3, closed  # deadline 1 s from accept
        idle.settimeout(5)
        assert idle.recv(1) == b""  # the lobby closed the silent one after 0.5 s
        assert s.client().info()["kind"] == "logistic"
    finally:
        s.close()


class SlowService(ScoringService):
    def score(self, *a, **kw):
        time.sleep(1.5)
        return super().score(*a, **kw)


def test_a_request_waiting_for_an_evaluation_slot_is_not_cut_off(model, fed, tmp_path):
    """Waiting for a worker is the server's time: with one slot, a 1 s request deadline and
    1.5 s evaluations, both of two concurrent batches are answered (and each charged once)."""
    s = Served(model, fed, tmp_path, service_cls=SlowService,
               limits=Limits(evaluations=1, handshake_timeout_s=0.5, header_timeout_s=0.5))
    keys = Keyring.generate(s.service.params)
    x = np.random.default_rng(2).normal(size=(4, 5))
    batch = Batch(keys.key_id, 4, tuple(keys.encrypt_batch(x)))
    try:
        c = s.client()
        sid = c.open_session(keys.evaluation_keys())
        got, errors = [], []

        def one():
            try:
                got.append(keys.decrypt_scores(c.score(sid, batch).blobs[0], 4))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and len(got) == 2
        for z in got:
            np.testing.assert_allclose(z, model.model.logits(x), atol=1e-4)
        assert s.quotas.used("bank-a")[1] == 2 * s.service.charge_for(batch)
    finally:
        s.close()
