"""Bounded server resources (issue 14), played by the attacker: a flood of idle gRPC streams
from one token, oversized declared bodies in both directions, an operator revoking a client
while the run goes on, and the owner-only files the server writes.

The flood runs over real gRPC + TLS on loopback; revocation runs over the in-memory transport
(deterministic: the registry is rewritten at a chosen point of the run).
"""

from __future__ import annotations

import os
import stat
import threading
import time

import grpc
import numpy as np
import pytest

from hefl.data.federated import FederatedData
from hefl.errors import Refused, TransportError
from hefl.net import wire
from hefl.net.client import ClientSettings, FederationClient, _tasks, make_channel
from hefl.net.config import build_model, load_config
from hefl.net.coordinator import Coordinator
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.testing import events, make_demo, run_in_memory, run_in_threads

MODEL = {"kind": "logreg", "n_features": 4, "n_classes": 2}
SIZE = build_model(MODEL).spec.size
FLOOD = 50
FIRST_FRAME_S = 1.0


def toy_data(parties: int = 3) -> FederatedData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20 * parties, 4))
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    return FederatedData.from_indices(x, y, [range(20 * i, 20 * (i + 1)) for i in range(parties)])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flood_demo(tmp_path, tag: str):
    # eve is registered (a valid token) and never trains: both runs wait the same for her
    return make_demo(tmp_path / tag, toy_data(), model=MODEL, rounds=3, clients_per_round=3,
                     names=("c0", "c1", "eve"),
                     server={"min_clients": 2, "start_timeout_s": 1.0, "join_timeout_s": 0.5,
                             "first_frame_timeout_s": FIRST_FRAME_S})


def open_idle_submits(demo, n: int, release: threading.Event) -> list[grpc.Future]:
    """``n`` Submit streams with eve's token that never send a frame."""
    s = ClientSettings(server=demo.address, data=None, ca=demo.fed.ca,
                       token=wire.Token.parse(demo.fed.token("eve").read_text()))
    ch = make_channel(s)
    fn = ch.stream_unary(wire.method("Submit"),
                         request_serializer=pb.ClientFrame.SerializeToString,
                         response_deserializer=pb.SubmitReply.FromString)

    def silent():
        release.wait(60)
        return
        yield  # a generator that yields nothing until released

    futures = [fn.future(silent(), metadata=s.token.metadata(), timeout=60) for _ in range(n)]
    futures[0].channel = ch  # keep the channel alive with the futures
    return futures


@pytest.mark.timeout(120)
def test_idle_stream_flood_from_one_token_does_not_delay_honest_clients(tmp_path):
    honest = {"c0": {}, "c1": {}}
    t0 = time.perf_counter()
    base_records, base_params, _ = run_in_threads(flood_demo(tmp_path, "base"), honest)
    baseline = time.perf_counter() - t0

    demo = flood_demo(tmp_path, "flood")
    release = threading.Event()
    outcome: dict[str, object] = {}

    def honest_run() -> None:
        t = time.perf_counter()
        outcome["result"] = run_in_threads(demo, honest)
        outcome["seconds"] = time.perf_counter() - t

    rss0 = rss_bytes()
    runner = threading.Thread(target=honest_run, daemon=True)
    runner.start()
    # the flood starts once the server listens, before the honest clients' first round
    deadline = time.monotonic() + 30
    while not (demo.root / "server.log").exists() or not events(demo.root / "server.log"):
        assert time.monotonic() < deadline, "server never started"
        time.sleep(0.01)
    futures = open_idle_submits(demo, FLOOD, release)
    refused = [f for f in futures if _wait_done(f, 10.0)]
    rss_flood = rss_bytes()
    runner.join(90)
    release.set()
    assert "result" in outcome, "the honest run did not finish"
    records, params, _ = outcome["result"]  # type: ignore[misc]

    # honest clients trained every round, as without the flood, and no slower than a second
    assert [(r.selected, r.contributors) for r in records] == [
        (r.selected, r.contributors) for r in base_records] == [(3, 2)] * 3
    np.testing.assert_array_equal(params, base_params)
    assert outcome["seconds"] <= baseline + 1.0, (outcome["seconds"], baseline)
    assert baseline > 2 * FIRST_FRAME_S  # the admitted streams' deadline passed mid-run

    # all but streams_per_client were refused at once; the admitted two were cancelled when
    # they sent no header within first_frame_timeout_s
    codes = [f.exception().code() for f in futures]
    details = [f.exception().details() or "" for f in futures]
    assert len(refused) >= FLOOD - 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == FLOOD - 2, codes
    assert all("already has 2 open Submit streams" in d
               for c, d in zip(codes, details, strict=True)
               if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert codes.count(grpc.StatusCode.CANCELLED) == 2, codes
    # idle streams hold no buffers: the server's process grew by far less than one body cap
    assert rss_flood - rss0 < 64 << 20, (rss0, rss_flood)


def _wait_done(f: grpc.Future, seconds: float) -> bool:
    try:
        f.exception(timeout=seconds)
        return True
    except grpc.FutureTimeoutError:
        return False


def test_body_caps_match_the_model_on_both_sides(tmp_path):
    demo = make_demo(tmp_path, toy_data(), model=MODEL, rounds=1, clients_per_round=3)
    cfg = load_config(demo.config)
    assert cfg.server.max_update_mb is None  # the default is sized to the model
    size = SIZE
    assert wire.body_cap(size) == 32 * size + (4 << 20)
    assert wire.body_cap(size, messages=3) == 3 * wire.body_cap(size)
    # the cap admits the largest upload hefl makes (BFV threshold custody: 27.3 B/param)
    assert wire.body_cap(6_603_710) > 27.3 * 6_603_710
    with pytest.raises(wire.BodyError, match="exceeds the limit") as e:
        wire.check_size(wire.body_cap(size) + 1, wire.body_cap(size))
    assert e.value.code == "RESOURCE_EXHAUSTED"

    # the client refuses a server's oversized declared body before reading any of it
    read: list[int] = []

    def frames():
        yield pb.ServerFrame(header=pb.TaskHeader(kind=pb.TASK_FIT, body_size=1 << 40))
        for i in range(3):
            read.append(i)
            yield pb.ServerFrame(chunk=b"\0" * 16)

    with pytest.raises(TransportError, match="exceeds the limit"):
        next(_tasks(frames(), limit=wire.body_cap(size)))
    assert read == []

    # the server's cap and what a data client accepts, in a real (in-memory) run
    run = run_in_memory(demo)
    records, _ = run.finish()
    assert [r.contributors for r in records] == [3]
    assert run.coordinator.max_body == wire.body_cap(size)
    assert all(c._task_limit == wire.body_cap(size) for c in run.clients.values())


class PadsItsUpload(FederationClient):
    """A rogue data client: its answer is one byte over the model-sized cap."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        connect, self.replies = self.connect, []

        def padded():
            t = connect()
            submit = t.submit

            def big(header, body):
                try:
                    return submit(header, body + b"\0" * (wire.body_cap(SIZE) + 1 - len(body)))
                except Refused as e:
                    self.replies.append(e)
                    raise

            t.submit = big  # type: ignore[method-assign]
            return t

        self.connect = padded


@pytest.mark.timeout(60)
def test_server_refuses_an_upload_over_the_model_sized_cap(tmp_path):
    demo = make_demo(tmp_path, toy_data(), model=MODEL, rounds=1, clients_per_round=3,
                     server={"min_clients": 2, "round_timeout_s": 60.0})
    run = run_in_memory(demo, client_class={"c2": PadsItsUpload})
    deadline = time.monotonic() + 30
    while not run.clients["c2"].replies:  # its oversized answer came while the round was open
        assert time.monotonic() < deadline, "c2 never answered"
        time.sleep(0.01)

    def honest_answers() -> int:
        task = run.coordinator.task
        return 0 if task is None else len(task.results)

    while honest_answers() < 2:  # on a loaded machine c0 and c1 can answer after c2
        assert time.monotonic() < deadline, "c0 and c1 never answered"
        time.sleep(0.01)
    run.advance(60.0)  # the round closes at its deadline without c2
    records, _ = run.finish()
    assert records[0].contributors == 2  # the run went on without it
    (refusal,) = run.clients["c2"].replies
    assert refusal.code == "RESOURCE_EXHAUSTED" and "exceeds the limit" in refusal.reason, refusal


class RevokesAfterRoundOne(Coordinator):
    """The operator sets ``revoked = true`` for c1 in the registry file once round 1 is stored
    (the coordinator re-reads the file at each round start and each authentication)."""

    revoked = False

    def refresh_registry(self) -> None:
        if self.completed >= 1 and not self.revoked and self.cfg.registry is not None:
            RevokesAfterRoundOne.revoked = True
            text = self.cfg.registry.read_text()
            start = text.index('name = "c1"')
            end = text.find("[[client]]", start)
            end = len(text) if end < 0 else end
            block = text[start:end].replace("revoked = false", "revoked = true")
            self.cfg.registry.write_text(text[:start] + block + text[end:])
        super().refresh_registry()


@pytest.mark.timeout(60)
def test_revocation_takes_effect_without_a_restart(tmp_path):
    RevokesAfterRoundOne.revoked = False
    demo = make_demo(tmp_path, toy_data(), model=MODEL, rounds=3, clients_per_round=3,
                     server={"min_clients": 2})
    assert "revoked = false" in (demo.root / "certs" / "clients.toml").read_text()
    run = run_in_memory(demo, coordinator_class=RevokesAfterRoundOne)
    records, _ = run.finish()
    assert RevokesAfterRoundOne.revoked
    # round 1 had c1; from round 2 on it is not waited for, and it cannot come back
    assert [r.contributors for r in records] == [3, 2, 2]
    assert all("c1" in r.rejected for r in records[1:]) or all(
        r.selected == 2 for r in records[1:]), [(r.selected, r.rejected) for r in records]
    err = getattr(run.clients["c1"], "error", None)
    assert isinstance(err, TransportError) and "revoked" in str(err), err
    log = demo.root / "server.log"
    assert [e["client"] for e in events(log, "registry_updated")] == ["c1"]
    assert any(e.get("reason") == "revoked" for e in events(log, "auth_refused"))
    from hefl.net.store import Store

    rows = {c["name"]: c for c in Store(demo.state, readonly=True).clients(run.coordinator.run_id)}
    assert rows["c1"]["revoked"] and not rows["c0"]["revoked"]


def test_server_files_are_owner_only(tmp_path):
    demo = make_demo(tmp_path, toy_data(), model=MODEL, rounds=1, clients_per_round=3)
    run = run_in_memory(demo)
    run.finish()
    db = demo.state / "hefl.db"
    assert db.exists()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    from hefl.net.logs import get_logger

    log_file = tmp_path / "logs" / "server.log"
    log = get_logger("hefl.test.files", file=log_file)
    log.info("x")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
