"""Bad input over the wire: each refused with a gRPC status that says why, while the server keeps
running and loses nothing (the run still ends with the simulation's model).

Server and the two honest clients run in this process (threads); the third client is driven by
hand to send malformed, truncated, oversized, replayed, wrong-run, wrong-shape and NaN messages.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import grpc
import numpy as np
import pytest

from hefl.aggregation import PlainAggregator, PlainPayload
from hefl.algorithms import fedavg
from hefl.client import FitConfig, ModelClient
from hefl.data.federated import FederatedData
from hefl.errors import TransportError
from hefl.models.linear import LogisticRegressionModel
from hefl.net import wire
from hefl.net.client import ClientSettings, FederationClient, _tasks, make_channel
from hefl.net.config import ClientEntry, load_config
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.server import FederationServer
from hefl.net.testing import make_demo
from hefl.rounds import client_payload
from hefl.simulation import simulate

MODEL = {"kind": "logreg", "n_features": 4, "n_classes": 2}


def toy_data() -> FederatedData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) > 0).astype(np.int64)
    return FederatedData.from_indices(x, y, [range(0, 20), range(20, 45), range(45, 60)])


def quiet(name: str, path) -> logging.Logger:
    from hefl.net.logs import get_logger

    return get_logger(name, stream=open(path, "a"))


def settings(demo, name: str, **kw) -> ClientSettings:
    tok = wire.Token.parse(demo.fed.token(name).read_text())
    return ClientSettings(server=demo.address, data=demo.data[name], token=tok, ca=demo.fed.ca,
                          backoff_s=(0.05, 0.5), give_up_s=30, **kw)


def call_submit(channel, md, frames, raw: bool = False):
    """Submit frames; returns (status code, details)."""
    fn = channel.stream_unary(
        wire.method("Submit"),
        request_serializer=(lambda b: b) if raw else pb.ClientFrame.SerializeToString,
        response_deserializer=pb.SubmitReply.FromString,
    )
    try:
        reply = fn(iter(frames), metadata=md, timeout=20)
        return grpc.StatusCode.OK, reply.message
    except grpc.RpcError as e:
        return e.code(), e.details()


def update_frames(h: pb.TaskHeader, body: bytes, n: int = 15, **over):
    header = pb.UpdateHeader(run_id=h.run_id, round=h.round, task_id=h.task_id,
                             kind=pb.TASK_FIT, num_examples=n, metrics={"loss": 0.5})
    for k, v in over.items():
        if k == "metrics":
            header.metrics.clear()
            header.metrics.update(v)
        else:
            setattr(header, k, v)
    return list(wire.client_frames(header, body))


@pytest.mark.timeout(120)
def test_bad_messages_are_refused_and_nothing_is_lost(tmp_path):
    data = toy_data()
    demo = make_demo(tmp_path, data, model=MODEL, rounds=2, clients_per_round=3,
                     server={"min_clients": 3, "max_update_mb": 0.001, "heartbeat_s": 0.5})
    srv = FederationServer(load_config(demo.config), log=quiet("t.srv", tmp_path / "srv.log"))
    srv.start()
    runner = threading.Thread(target=srv.run, daemon=True)
    runner.start()
    honest = [FederationClient(settings(demo, n, fit_delay_s=1.0),
                               log=quiet(f"t.{n}", tmp_path / f"{n}.log")) for n in ("c0", "c1")]
    threads = [threading.Thread(target=c.run, daemon=True) for c in honest]
    for t in threads:
        t.start()

    me = settings(demo, "c2")
    md = me.token.metadata()
    model = LogisticRegressionModel(4, 2)
    agg = PlainAggregator(model.spec.size)
    local = ModelClient(model, data.train[2])
    seen: dict[str, list] = {}
    with make_channel(me) as ch:
        join = ch.unary_unary(wire.method("Join"),
                              request_serializer=pb.JoinRequest.SerializeToString,
                              response_deserializer=pb.JoinReply.FromString)
        run_id = join(pb.JoinRequest(protocol_version=wire.PROTOCOL_VERSION), metadata=md).run_id
        sub = ch.unary_stream(wire.method("Subscribe"),
                              request_serializer=pb.SubscribeRequest.SerializeToString,
                              response_deserializer=pb.ServerFrame.FromString)
        tasks = _tasks(sub(pb.SubscribeRequest(run_id=run_id), metadata=md),
                       limit=wire.body_cap(model.spec.size))
        previous = None
        for h, body in tasks:
            if h.kind == pb.TASK_DONE:
                break
            if h.kind != pb.TASK_FIT:
                continue
            params = wire.vector_from(body, model.spec.size)
            c = h.config
            res = local.fit(params, FitConfig(c.round, c.lr, c.epochs, c.batch_size, c.prox_mu,
                                              c.seed))
            good = agg.dumps(client_payload(agg, "c2", params, res))
            cases = {
                "malformed": ([b"\xff\xfe not a protobuf"], True),
                "chunk_first": ([pb.ClientFrame(chunk=b"x").SerializeToString()], True),
                "truncated": (update_frames(h, good)[:1]
                              + [pb.ClientFrame(chunk=good[:-5])], False),
                "oversized": (update_frames(h, b"\0" * 2000), False),
                "huge_frame": ([pb.ClientFrame(chunk=b"\0" * (2 * wire.CHUNK_BYTES))], False),
                "wrong_run": (update_frames(h, good, run_id="someone-else"), False),
                "wrong_task": (update_frames(h, good, task_id="forged"), False),
                "future_round": (update_frames(h, good, round=h.round + 5), False),
                "wrong_shape": (update_frames(h, good + b"\0" * 8), False),
                "nan": (update_frames(h, agg.dumps(PlainPayload(
                    np.full(model.spec.size, np.nan), 15.0))), False),
                "nan_metric": (update_frames(h, good, metrics={"loss": float("nan")}), False),
            }
            if previous is not None:
                cases["replayed_old_round"] = (previous, False)
            for name, (frames, raw) in cases.items():
                seen.setdefault(name, []).append(call_submit(ch, md, frames, raw=raw))
            frames = update_frames(h, good, n=res.num_examples, metrics=dict(res.metrics))
            assert call_submit(ch, md, frames)[0] == grpc.StatusCode.OK
            seen.setdefault("duplicate", []).append(call_submit(ch, md, frames))
            previous = frames
    runner.join(60)
    for t in threads:
        t.join(30)
    history = srv.store.records(srv.run_id)
    params = srv.store.resume_point(srv.run_id)[1]
    srv.stop()

    C = grpc.StatusCode
    expect = {
        "malformed": (C.INVALID_ARGUMENT, "malformed frame"),
        "chunk_first": (C.INVALID_ARGUMENT, "first frame must be a header"),
        "truncated": (C.INVALID_ARGUMENT, "truncated"),
        "oversized": (C.RESOURCE_EXHAUSTED, "exceeds the limit"),
        "huge_frame": (C.RESOURCE_EXHAUSTED, ""),
        "wrong_run": (C.FAILED_PRECONDITION, "wrong run"),
        "wrong_task": (C.FAILED_PRECONDITION, "task id does not match"),
        "future_round": (C.FAILED_PRECONDITION, "is not open"),
        "wrong_shape": (C.INVALID_ARGUMENT, "expected 48"),  # 8 + 8 bytes per parameter
        "nan": (C.INVALID_ARGUMENT, "NaN/Inf"),
        "nan_metric": (C.INVALID_ARGUMENT, "NaN/Inf"),
        "replayed_old_round": (C.FAILED_PRECONDITION, "already completed"),
        "duplicate": (C.ALREADY_EXISTS, "replay refused"),
    }
    for name, (code, words) in expect.items():
        assert seen.get(name), f"case {name} never ran"
        for got_code, details in seen[name]:
            assert got_code == code, (name, got_code, details)
            assert words in (details or ""), (name, details)
    assert [r.contributors for r in history] == [3, 3]
    ref = simulate(LogisticRegressionModel(4, 2), data, fedavg(), rounds=2, clients_per_round=3)
    np.testing.assert_allclose(params, ref.params, rtol=0, atol=1e-6)


@pytest.mark.timeout(60)
def test_unknown_revoked_and_mtls_identity(tmp_path):
    data = toy_data()
    demo = make_demo(tmp_path, data, model=MODEL, rounds=1, clients_per_round=3)
    cfg = load_config(demo.config)
    eve = wire.Token("eve", "e" * 32)
    clients = cfg.clients[:2] + (dataclasses.replace(cfg.clients[2], revoked=True),
                                 ClientEntry("eve", eve.sha256, revoked=True))
    tls = dataclasses.replace(cfg.tls, client_ca=demo.fed.ca)
    srv = FederationServer(dataclasses.replace(cfg, clients=clients, tls=tls),
                           log=quiet("t.auth", tmp_path / "auth.log"))
    srv.start()

    def join(name: str, token: str | None, cert_of: str | None):
        cert, key = demo.fed.client_cert(cert_of) if cert_of else (None, None)
        s = ClientSettings(server=demo.address, data=demo.data["c0"], ca=demo.fed.ca,
                           token=wire.Token(name, "x" * 20), cert=cert, key=key)
        md = (("authorization", f"Bearer {token}"),) if token else ()
        with make_channel(s) as ch:
            fn = ch.unary_unary(wire.method("Join"),
                                request_serializer=pb.JoinRequest.SerializeToString,
                                response_deserializer=pb.JoinReply.FromString)
            try:
                return grpc.StatusCode.OK, fn(pb.JoinRequest(protocol_version=wire.PROTOCOL_VERSION), metadata=md,
                                              timeout=10).index
            except grpc.RpcError as e:
                return e.code(), e.details()

    try:
        c0 = demo.fed.token("c0").read_text().strip()
        c1 = demo.fed.token("c1").read_text().strip()
        c2 = demo.fed.token("c2").read_text().strip()
        C = grpc.StatusCode
        assert join("c0", c0, "c0") == (C.OK, 0)
        assert join("c1", c1, "c1") == (C.OK, 1)
        code, why = join("c0", None, "c0")
        assert code == C.UNAUTHENTICATED and "no credentials" in why
        code, why = join("c0", "c0:" + "w" * 30, "c0")
        assert code == C.UNAUTHENTICATED and "wrong token" in why
        code, why = join("c2", c2, "c2")
        assert code == C.PERMISSION_DENIED and "revoked" in why
        code, why = join("eve", str(eve), "c0")
        assert code == C.PERMISSION_DENIED and "revoked" in why
        code, why = join("c1", c1, "c0")  # c1's token over c0's certificate
        assert code == C.PERMISSION_DENIED and "does not belong" in why
        code, _ = join("c0", c0, None)  # mTLS required: no certificate, no connection
        assert code == C.UNAVAILABLE
        assert "x" * 20 not in (tmp_path / "auth.log").read_text()
    finally:
        srv.stop()


@pytest.mark.timeout(60)
def test_local_misconfiguration_fails_at_once_instead_of_retrying(tmp_path):
    import json
    import time

    from hefl.errors import ConfigError

    data = toy_data()
    demo = make_demo(tmp_path, data, model=MODEL, rounds=1, clients_per_round=3)
    with pytest.raises(ConfigError, match="--ca .*no such file"):
        FederationClient(dataclasses.replace(settings(demo, "c0"), ca=tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="--cert and --key"):
        FederationClient(dataclasses.replace(settings(demo, "c0"),
                                             cert=demo.fed.client_cert("c0")[0]))
    srv = FederationServer(load_config(demo.config), log=quiet("t.cfg", tmp_path / "cfg.log"))
    srv.start()
    try:
        t0 = time.monotonic()
        no_ca = dataclasses.replace(settings(demo, "c0"), ca=None, give_up_s=300)
        with pytest.raises(ConfigError, match="not trusted .* pass --ca"):
            FederationClient(no_ca, log=quiet("t.c0", tmp_path / "c0.log")).run()
        assert time.monotonic() - t0 < 20  # not give_up_s of reconnecting
    finally:
        srv.stop()

    class EncryptedRun:  # a server whose run is encrypted, reached by a client with no --he-key
        def join(self, req):
            return pb.JoinReply(run_id="r", model_json=json.dumps(MODEL),
                                aggregation_json=json.dumps({"kind": "bfv"}))

        def close(self):
            pass

    joins = []
    c = FederationClient(dataclasses.replace(settings(demo, "c0"), give_up_s=300),
                         log=quiet("t.c1", tmp_path / "c1.log"),
                         connect=lambda: joins.append(1) or EncryptedRun())
    with pytest.raises(ConfigError, match="pass --he-key"):
        c.run()
    assert joins == [1]  # refused on the first join, never retried


@pytest.mark.timeout(60)
def test_a_client_without_a_certificate_at_an_mtls_server_is_told_to_pass_one(tmp_path):
    """The README's quickstart turns mTLS on; a client that forgets --cert/--key cannot tell
    a closed handshake from a server not yet up, so it retries, but says what to try."""
    demo = make_demo(tmp_path, toy_data(), model=MODEL, rounds=1, clients_per_round=3)
    cfg = load_config(demo.config)
    srv = FederationServer(dataclasses.replace(cfg, tls=dataclasses.replace(
        cfg.tls, client_ca=demo.fed.ca)), log=quiet("t.mtls", tmp_path / "mtls.log"))
    srv.start()
    try:
        log = tmp_path / "c0.log"
        c = FederationClient(dataclasses.replace(settings(demo, "c0"), give_up_s=2),
                             log=quiet("t.nocert", log))
        with pytest.raises(TransportError, match="could not reach .*pass --cert"):
            c.run()
        assert '"hint"' in log.read_text() and "--key certs/clients/NAME.key" in log.read_text()
    finally:
        srv.stop()
