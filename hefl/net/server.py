"""The federation server: runs the rounds of ``hefl.rounds`` over gRPC, keeps state in SQLite.

Each round (one *attempt* at a time):

    ids     = sample_clients(N, per_round, seed, r)          same as hefl.simulation.run
    wait up to join/start timeout for the chosen clients to be connected
    push a FIT task (global params + fit_config) on each participant's Subscribe stream
    collect Submit streams until every participant answered or dropped, the wait fraction is
        reached, or the round deadline passes
    fewer than min_clients answers -> the attempt is abandoned and the round retried
    aggregate (payloads summed in the chosen order) -> server_step -> commit round atomically

A client whose stream closes mid-round is dropped from that attempt; a client may (re)join
between rounds. Every refusal is a gRPC status whose details say why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from hefl.client import FitConfig
from hefl.data.federated import ClientData
from hefl.errors import ClientError, RoundError, TransportError, UpdateRejected
from hefl.history import History
from hefl.net import wire
from hefl.net.config import (
    RunConfig,
    build_aggregator,
    build_algorithm,
    build_model,
    is_encrypted,
)
from hefl.net.data import load_client_data
from hefl.net.logs import event, get_logger
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.store import Store, write_atomic
from hefl.rounds import RoundRecord, fit_config, sample_clients, server_step
from hefl.simulation import _weighted

StatusCode = grpc.StatusCode


class NoKeyHolder(RoundError):
    """No key holder could decrypt this round's aggregate (the round is retried)."""


class RemoteKeyHolder:
    """The key-holder half of the Aggregator seam, reached over the wire."""

    def __init__(self, server: FederationServer, round_num: int) -> None:
        self.server = server
        self.round = round_num

    def decode(self, aggregate: Any) -> tuple[np.ndarray, float]:
        return self.server.remote_decode(self.round, aggregate)


class Refused(Exception):
    """A request refused with a gRPC status code and a reason."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Session:
    """One live Subscribe stream of a client."""

    name: str
    key_holder: bool = False
    alive: bool = True
    sent: set[str] = field(default_factory=set)


@dataclass
class DecodeTask:
    """An encrypted sum sent to one key holder; its answer is the mean delta and total weight."""

    round: int
    task_id: str
    target: str
    body: bytes
    answer: tuple[np.ndarray, float] | None = None
    error: str | None = None
    open: bool = True


@dataclass(frozen=True)
class Result:
    payload: Any
    num_examples: int
    metrics: dict[str, float]
    nbytes: int


@dataclass
class FitTask:
    round: int
    attempt: int
    task_id: str
    chosen: list[str]
    participants: frozenset[str]
    configs: dict[str, FitConfig]
    body: bytes
    results: dict[str, Result] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    open: bool = True

    def settled(self) -> bool:
        return all(n in self.results or n in self.dropped for n in self.participants)


def _config_pb(c: FitConfig) -> pb.FitConfig:
    return pb.FitConfig(
        round=c.round, lr=c.lr, epochs=c.epochs, batch_size=c.batch_size, prox_mu=c.prox_mu,
        seed=c.seed,
    )


def _parse(cls: Any, raw: bytes, what: str) -> Any:
    try:
        return cls.FromString(raw)
    except (DecodeError, TypeError, ValueError) as e:
        raise Refused(StatusCode.INVALID_ARGUMENT, f"malformed {what}: {e}") from e


def _handle(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``Refused`` (and hefl errors) into a gRPC status; nothing crashes the server."""

    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(request, context)
        except Refused as e:
            context.abort(e.code, e.reason)

    return wrapper


class FederationServer:
    """Runs one configured run to completion (resuming from its state directory).

    Example:
        >>> srv = FederationServer(load_config("run.toml"))   # doctest: +SKIP
        >>> srv.start(); srv.run(); srv.stop()                 # doctest: +SKIP
    """

    def __init__(self, cfg: RunConfig, log: logging.Logger | None = None) -> None:
        self.cfg = cfg
        self.run_id = cfg.run_id
        self.names = [c.name for c in cfg.clients if c.role == "client"]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.encrypted = is_encrypted(cfg.aggregation)
        self.registry = {c.name: c for c in cfg.clients}
        self.algorithm = build_algorithm(cfg.algorithm)
        self.model = build_model(cfg.model)
        self.size = int(self.model.spec.size)
        self.aggregator = build_aggregator(cfg.aggregation, self.size)
        self.log = log or get_logger("hefl.server", file=cfg.state_dir / "server.log")
        self.store = Store(cfg.state_dir)
        self.test: ClientData | None = (
            load_client_data(cfg.server.test_data) if cfg.server.test_data else None
        )
        self.cond = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.task: FitTask | None = None
        self.decoding: DecodeTask | None = None
        self.completed = 0
        self.done = False
        self.stopping = threading.Event()
        self.max_body = int(cfg.server.max_update_mb * (1 << 20))
        self.life = secrets.token_hex(4)  # distinguishes task ids across server restarts
        self._grpc: grpc.Server | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Bind and start serving; returns the port (useful with address ``HOST:0``)."""
        n = len(self.cfg.clients)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=2 * n + 16, thread_name_prefix="hefl-rpc"),
            options=wire.GRPC_OPTIONS + [
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail
                # clients ping every keepalive_time_ms: allow it rather than answer GOAWAY
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ],
        )
        server.add_generic_rpc_handlers((self._handlers(),))
        addr = self.cfg.server.address
        try:
            if self.cfg.tls.insecure:
                self.port = server.add_insecure_port(addr)
            else:
                self.port = server.add_secure_port(addr, self._credentials())
        except RuntimeError as e:
            raise TransportError(f"cannot listen on {addr!r}: {e}; is the port in use?") from e
        server.start()
        self._grpc = server
        host = addr.rsplit(":", 1)[0]
        write_atomic(self.cfg.state_dir / "endpoint", f"{host}:{self.port}\n")
        event(self.log, "listening", address=f"{host}:{self.port}", run_id=self.run_id,
              tls=not self.cfg.tls.insecure, mtls=self.cfg.tls.client_ca is not None)
        return self.port

    def _credentials(self) -> grpc.ServerCredentials:
        tls = self.cfg.tls
        try:
            pair = (tls.key.read_bytes(), tls.cert.read_bytes())  # type: ignore[union-attr]
            ca = tls.client_ca.read_bytes() if tls.client_ca else None
        except OSError as e:
            raise TransportError(f"cannot read TLS files: {e}; run `hefl certs`") from e
        return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def request_stop(self) -> None:
        """Ask ``run`` to stop at the next step (it raises ``RoundError``); safe from any
        thread. Completed rounds stay on disk; the round in flight is redone on restart."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()

    def stop(self, grace: float = 1.0) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        self.store.close()

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "Join": grpc.unary_unary_rpc_method_handler(
                    _handle(self._join), response_serializer=pb.JoinReply.SerializeToString
                ),
                "Subscribe": grpc.unary_stream_rpc_method_handler(
                    self._subscribe, response_serializer=pb.ServerFrame.SerializeToString
                ),
                "Submit": grpc.stream_unary_rpc_method_handler(
                    _handle(self._submit), response_serializer=pb.SubmitReply.SerializeToString
                ),
            },
        )

    # ------------------------------------------------------------------ the round driver

    def run(self) -> History:
        """Run (or resume) the configured rounds; returns the run's full history."""
        cfg = self.cfg
        init = self.model.init_vector()
        existed = self.store.open_run(
            self.run_id, cfg.public_dict(), rounds=cfg.rounds, initial=init,
            opt_state=wire.pack_state(self.algorithm.server.init(init)),
        )
        self.store.register_clients(self.run_id, [(c.name, c.revoked) for c in cfg.clients])
        last, params, state_bytes = self.store.resume_point(self.run_id)
        opt_state = wire.unpack_state(state_bytes)
        self.completed = last
        event(self.log, "resumed" if existed else "run_started", run_id=self.run_id,
              last_completed_round=last, rounds=cfg.rounds, clients=len(self.names))
        first = True
        for r in range(last + 1, cfg.rounds + 1):
            attempt = 0
            while True:
                attempt += 1
                out = self._attempt(r, attempt, params, opt_state, first)
                first = False
                if out is not None:
                    params, opt_state = out
                    break
                if self.stopping.is_set():
                    raise RoundError("server stopped before the run finished; restart to resume")
                if cfg.server.max_attempts and attempt >= cfg.server.max_attempts:
                    raise RoundError(
                        f"round {r} failed {attempt} times (fewer than min_clients="
                        f"{cfg.server.min_clients} answers); state is kept, restart to retry"
                    )
                self.stopping.wait(cfg.server.retry_delay_s)
        self.store.set_status(self.run_id, "finished")
        history = History(self.store.records(self.run_id))
        self._export(history, plot=True)
        event(self.log, "run_finished", run_id=self.run_id, rounds=len(history))
        with self.cond:
            self.done = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: not self.sessions, timeout=5.0)  # let clients hear DONE
        return history

    def _note(self, name: str, what: str) -> None:
        """Record a client's last event for ``hefl status`` (best effort, never fatal)."""
        with contextlib.suppress(sqlite3.Error):
            self.store.client_event(self.run_id, name, what)

    def _live(self, name: str) -> bool:
        s = self.sessions.get(name)
        return s is not None and s.alive

    def _attempt(
        self, r: int, attempt: int, params: np.ndarray, opt_state: Any, first: bool
    ) -> tuple[np.ndarray, Any] | None:
        s = self.cfg.server
        t0 = time.perf_counter()
        idx = sample_clients(len(self.names), self.cfg.clients_per_round, self.cfg.seed, r)
        chosen = [self.names[i] for i in idx]
        configs = {self.names[i]: fit_config(self.algorithm, self.cfg.seed, r, i) for i in idx}
        wanted = [n for n in chosen if not self.registry[n].revoked]  # revoked never connect
        with self.cond:
            self.cond.wait_for(
                lambda: self.stopping.is_set() or all(self._live(n) for n in wanted),
                timeout=s.start_timeout_s if first else s.join_timeout_s,
            )
            participants = frozenset(n for n in chosen if self._live(n))
            if len(participants) < s.min_clients:
                event(self.log, "round_retry", level=logging.WARNING, round=r, attempt=attempt,
                      reason=f"{len(participants)} of {len(chosen)} chosen clients connected, "
                      f"min_clients={s.min_clients}", absent=sorted(set(chosen) - participants))
                return None
            task = FitTask(r, attempt, f"{self.run_id}/{r}/{attempt}/{self.life}", chosen,
                           participants, configs, wire.vector_bytes(params))
            self.task = task
            self.cond.notify_all()
        event(self.log, "round_started", round=r, attempt=attempt, chosen=chosen,
              participants=sorted(participants))
        need = math.ceil(s.wait_fraction * len(participants))
        deadline = time.monotonic() + s.round_timeout_s
        with self.cond:
            self.cond.wait_for(
                lambda: self.stopping.is_set() or task.settled() or len(task.results) >= need,
                timeout=max(0.0, deadline - time.monotonic()),
            )
            task.open = False
            self.task = None
            results = dict(task.results)
            rejected = {n: "not connected at round start" for n in chosen if n not in participants}
            for n in participants:
                if n not in results:
                    rejected[n] = task.dropped.get(n) or task.rejected.get(
                        n, "straggler: no answer before the round closed"
                    )
        if self.stopping.is_set():
            return None  # shutting down: leave the round to the next server life
        if len(results) < s.min_clients:
            event(self.log, "round_retry", level=logging.WARNING, round=r, attempt=attempt,
                  reason=f"{len(results)} answers, min_clients={s.min_clients}", rejected=rejected)
            return None
        # Same order as the simulation: the chosen order, not arrival order.
        payloads = {n: results[n].payload for n in chosen if n in results
                    and results[n].num_examples > 0}
        losses = [(results[n].metrics["loss"], results[n].num_examples) for n in payloads
                  if "loss" in results[n].metrics]
        agg = self.aggregator.aggregate(payloads)
        rejected.update({str(k): v for k, v in agg.rejected.items()})
        skipped, weight = False, 0.0
        try:
            params, opt_state, weight = self._server_step(agg, params, opt_state, r)
        except NoKeyHolder as e:
            event(self.log, "round_retry", level=logging.WARNING, round=r, attempt=attempt,
                  reason=str(e))
            return None
        except RoundError as e:
            event(self.log, "round_skipped", level=logging.WARNING, round=r, reason=str(e))
            skipped = True
        metrics: dict[str, float] = {}
        if self.test is not None:
            ev = self.model.evaluate(params, self.test)
            metrics = {f"test_{k}": float(v) for k, v in ev.items() if k != "n"}
        record = RoundRecord(
            round=r, selected=len(chosen), contributors=agg.count, total_weight=weight,
            train_loss=_weighted(losses), metrics=metrics, rejected=rejected, skipped=skipped,
            wall_s=time.perf_counter() - t0,
            upload_bytes=sum(results[n].nbytes for n in payloads),
        )
        self.store.commit_round(self.run_id, record, params, wire.pack_state(opt_state))
        with self.cond:
            self.completed = r
        self._export(History(self.store.records(self.run_id)), plot=False)
        event(self.log, "round_completed", round=r, attempt=attempt, contributors=agg.count,
              selected=len(chosen), rejected=rejected, wall_s=round(record.wall_s, 4),
              metrics=metrics)
        return params, opt_state

    def _server_step(self, agg: Any, params: np.ndarray, opt_state: Any, r: int):
        """Decode where the key is and apply the server optimizer: plaintext here; encrypted by a
        key holder (``RemoteKeyHolder``), since this process holds no secret key."""
        decoder: Any = RemoteKeyHolder(self, r) if self.encrypted else self.aggregator
        return server_step(self.algorithm, decoder, agg, params, opt_state)

    def remote_decode(self, r: int, agg: Any) -> tuple[np.ndarray, float]:
        """Send the encrypted sum to a live key holder and wait for the mean and total weight.

        Raises:
            RoundError: nothing to decode, or the key holder refused (the round is skipped).
            NoKeyHolder: no key holder answered in time (the round is retried).
        """
        if agg.count == 0:
            raise RoundError("no usable client updates this round; nothing to decrypt")
        body = self.aggregator.dumps(agg.payload)
        deadline = time.monotonic() + self.cfg.server.round_timeout_s
        with self.cond:
            self.cond.wait_for(lambda: self.stopping.is_set() or self._key_holders(),
                               timeout=max(0.0, deadline - time.monotonic()))
            holders = self._key_holders()
            if not holders:
                raise NoKeyHolder("no key holder is connected to decrypt the aggregate")
            task = DecodeTask(r, f"{self.run_id}/{r}/decode/{secrets.token_hex(4)}",
                              holders[0], body)
            self.decoding = task
            self.cond.notify_all()
        event(self.log, "decode_requested", round=r, key_holder=task.target,
              contributors=agg.count, bytes=len(body))
        with self.cond:
            self.cond.wait_for(
                lambda: self.stopping.is_set() or task.answer is not None
                or task.error is not None or not self._live(task.target),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            task.open = False
            self.decoding = None
        if task.error is not None:
            raise RoundError(f"key holder {task.target!r} refused to decrypt: {task.error}")
        if task.answer is None:
            raise NoKeyHolder(f"key holder {task.target!r} did not answer")
        return task.answer

    def _key_holders(self) -> list[str]:
        return [n for n, s in self.sessions.items() if s.alive and s.key_holder]

    def _export(self, history: History, plot: bool) -> None:
        rows = "".join(json.dumps(r.to_dict()) + "\n" for r in history)
        write_atomic(self.cfg.state_dir / "metrics.jsonl", rows)
        if plot and len(history):
            import warnings

            with warnings.catch_warnings():  # a run without a test set has no accuracy curve
                warnings.simplefilter("ignore", UserWarning)
                history.plot(self.cfg.state_dir / "run.png", title=f"hefl run {self.run_id}")

    # ------------------------------------------------------------------ authentication

    def _auth(self, context: grpc.ServicerContext) -> str:
        try:
            token = wire.token_from_metadata(context.invocation_metadata())
        except TransportError as e:
            raise Refused(StatusCode.UNAUTHENTICATED, str(e)) from e
        entry = self.registry.get(token.name)
        import hmac

        if entry is None or not hmac.compare_digest(entry.token_sha256, token.sha256):
            event(self.log, "auth_refused", level=logging.WARNING, client=token.name,
                  peer=context.peer())
            raise Refused(StatusCode.UNAUTHENTICATED,
                          f"unknown client {token.name!r} or wrong token; ask the operator")
        if entry.revoked:
            event(self.log, "auth_refused", level=logging.WARNING, client=token.name,
                  reason="revoked")
            raise Refused(StatusCode.PERMISSION_DENIED, f"client {token.name!r} is revoked")
        if self.cfg.tls.client_ca is not None:
            cns = [c.decode() for c in context.auth_context().get("x509_common_name", [])]
            if token.name not in cns:
                raise Refused(StatusCode.PERMISSION_DENIED,
                              f"client certificate {cns} does not belong to {token.name!r}")
        return token.name

    # ------------------------------------------------------------------ RPC handlers

    def _join(self, raw: bytes, context: grpc.ServicerContext) -> pb.JoinReply:
        name = self._auth(context)
        req = _parse(pb.JoinRequest, raw, "JoinRequest")
        if req.protocol_version != wire.PROTOCOL_VERSION:
            raise Refused(StatusCode.FAILED_PRECONDITION,
                          f"protocol version {req.protocol_version} is not supported; this "
                          f"server speaks {wire.PROTOCOL_VERSION}: upgrade hefl")
        event(self.log, "client_joined", client=name, peer=context.peer())
        self._note(name, "joined")
        return pb.JoinReply(
            run_id=self.run_id, protocol_version=wire.PROTOCOL_VERSION,
            model_json=json.dumps(dict(self.cfg.model)),
            aggregation_json=json.dumps(
                {k: v for k, v in self.cfg.aggregation.items() if k != "public"}),
            index=self.index.get(name, 0), rounds=self.cfg.rounds,
        )

    def _subscribe(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.ServerFrame]:
        try:
            name = self._auth(context)
            req = _parse(pb.SubscribeRequest, raw, "SubscribeRequest")
            if req.run_id != self.run_id:
                raise Refused(StatusCode.FAILED_PRECONDITION,
                              f"wrong run {req.run_id!r}: this server runs {self.run_id!r}; "
                              "join again")
        except Refused as e:
            context.abort(e.code, e.reason)
        if req.key_holder and not self.encrypted:
            context.abort(StatusCode.FAILED_PRECONDITION,
                          "this run aggregates in plaintext; it needs no key holder")
        if self.registry[name].role == "keyholder" and not req.key_holder:
            context.abort(StatusCode.PERMISSION_DENIED,
                          f"{name!r} is registered as a key holder; start it with --key-holder")
        sess = self._connect(name, req.key_holder)
        context.add_callback(lambda: self._disconnect(sess, "stream closed"))
        try:
            while True:
                with self.cond:
                    item = self.cond.wait_for(lambda: self._next(sess),
                                              timeout=self.cfg.server.heartbeat_s)
                if item == "dead" or not context.is_active():
                    return
                if item is None:
                    item = pb.TaskHeader(kind=pb.TASK_HEARTBEAT, run_id=self.run_id), b""
                header, body = item
                yield from wire.server_frames(header, body)
                if header.kind == pb.TASK_DONE:
                    return
        finally:
            self._disconnect(sess, "stream closed")

    def _connect(self, name: str, key_holder: bool) -> Session:
        with self.cond:
            old = self.sessions.get(name)
            if old is not None:
                old.alive = False  # superseded by a reconnect
            sess = Session(name, key_holder)
            self.sessions[name] = sess
            self.cond.notify_all()
        event(self.log, "client_connected", client=name, key_holder=key_holder)
        self._note(name, "connected")
        return sess

    def _disconnect(self, sess: Session, reason: str) -> None:
        with self.cond:
            if self.sessions.get(sess.name) is sess:
                del self.sessions[sess.name]
                t = self.task
                if (sess.alive and t is not None and t.open and sess.name in t.participants
                        and sess.name not in t.results):
                    t.dropped[sess.name] = f"disconnected mid-round ({reason})"
                    event(self.log, "client_dropped", level=logging.WARNING, client=sess.name,
                          round=t.round, attempt=t.attempt)
            was_alive, sess.alive = sess.alive, False
            self.cond.notify_all()
        if was_alive:
            event(self.log, "client_disconnected", client=sess.name)
            if not self.stopping.is_set():
                self._note(sess.name, "disconnected")

    def _next(self, sess: Session) -> Any:
        """What to push on this session now (called under the lock); None = nothing."""
        if not sess.alive or self.stopping.is_set():
            return "dead"
        if self.done:
            return pb.TaskHeader(kind=pb.TASK_DONE, run_id=self.run_id,
                                 message="run finished"), b""
        d = self.decoding
        if d is not None and d.open and d.target == sess.name and d.task_id not in sess.sent:
            sess.sent.add(d.task_id)
            return pb.TaskHeader(kind=pb.TASK_DECODE, run_id=self.run_id, round=d.round,
                                 task_id=d.task_id), d.body
        t = self.task
        if (t is not None and t.open and sess.name in t.participants
                and sess.name not in t.results and t.task_id not in sess.sent):
            sess.sent.add(t.task_id)
            header = pb.TaskHeader(kind=pb.TASK_FIT, run_id=self.run_id, round=t.round,
                                   task_id=t.task_id, config=_config_pb(t.configs[sess.name]))
            return header, t.body
        return None

    def _check_open(self, name: str, h: pb.UpdateHeader) -> FitTask:
        """The open task this answer belongs to (called under the lock)."""
        t = self.task
        if h.round <= self.completed:
            raise Refused(StatusCode.FAILED_PRECONDITION,
                          f"round {h.round} is already completed (replayed or stale answer); "
                          f"the current round is {self.completed + 1}")
        if t is None or not t.open or h.round != t.round:
            raise Refused(StatusCode.FAILED_PRECONDITION,
                          f"round {h.round} is not open; wait for the next task")
        if h.task_id != t.task_id:
            raise Refused(StatusCode.FAILED_PRECONDITION,
                          "task id does not match the open attempt of this round (stale answer "
                          "after a retry or a server restart); wait for the new task")
        if name not in t.participants:
            raise Refused(StatusCode.PERMISSION_DENIED,
                          f"client {name!r} is not a participant of round {h.round}")
        if name in t.results:
            raise Refused(StatusCode.ALREADY_EXISTS,
                          f"client {name!r} already answered round {h.round} (replay refused)")
        return t

    def _submit(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> pb.SubmitReply:
        name = self._auth(context)
        first = next(iter(frames), None)
        if first is None:
            raise Refused(StatusCode.INVALID_ARGUMENT, "empty submission: send a header frame")
        frame = _parse(pb.ClientFrame, first, "frame")
        if frame.WhichOneof("frame") != "header":
            raise Refused(StatusCode.INVALID_ARGUMENT, "the first frame must be a header")
        h = frame.header
        if h.run_id != self.run_id:
            raise Refused(StatusCode.FAILED_PRECONDITION,
                          f"wrong run {h.run_id!r}: this server runs {self.run_id!r}")
        if h.kind == pb.TASK_DECODE:
            return self._decoded(name, h, frames)
        if h.kind != pb.TASK_FIT:
            raise Refused(StatusCode.INVALID_ARGUMENT,
                          f"answers of kind {pb.TaskKind.Name(h.kind)} are not expected")
        with self.cond:
            task = self._check_open(name, h)
        try:
            body = wire.read_body(self._chunks(frames), h.body_size, h.body_sha256, self.max_body)
            result = self._validate(name, h, body)
        except wire.BodyError as e:
            raise Refused(getattr(StatusCode, e.code), str(e)) from e
        except ClientError as e:
            with self.cond:
                task.rejected[name] = e.reason
            event(self.log, "update_rejected", level=logging.WARNING, client=name,
                  round=h.round, reason=e.reason)
            raise Refused(StatusCode.INVALID_ARGUMENT, e.reason) from e
        with self.cond:
            if self._check_open(name, h) is not task:
                raise Refused(StatusCode.FAILED_PRECONDITION, "the round attempt changed")
            task.results[name] = result
            task.rejected.pop(name, None)
            self.cond.notify_all()
        event(self.log, "update_accepted", client=name, round=h.round, bytes=len(body))
        self._note(name, f"answered round {h.round}")
        return pb.SubmitReply(accepted=True, message=f"update for round {h.round} accepted")

    def _decoded(self, name: str, h: pb.UpdateHeader, frames: Iterator[bytes]) -> pb.SubmitReply:
        """A key holder's answer: the mean delta (float64) and ``total_weight``, or an error."""
        with self.cond:
            d = self.decoding
            if d is None or not d.open or d.task_id != h.task_id or d.target != name:
                raise Refused(StatusCode.FAILED_PRECONDITION,
                              "no such decode task is waiting for this client (stale or forged)")
        try:
            body = wire.read_body(self._chunks(frames), h.body_size, h.body_sha256,
                                  8 * self.size)
        except wire.BodyError as e:
            raise Refused(getattr(StatusCode, e.code), str(e)) from e
        answer = None
        if not h.error:
            weight = h.metrics.get("total_weight", float("nan"))
            try:
                mean = wire.vector_from(body, self.size)
            except TransportError as e:
                raise Refused(StatusCode.INVALID_ARGUMENT, str(e)) from e
            if not (np.isfinite(mean).all() and math.isfinite(weight) and weight > 0):
                raise Refused(StatusCode.INVALID_ARGUMENT,
                              "decoded mean or total_weight is not finite and positive")
            answer = (mean, float(weight))
        with self.cond:
            if self.decoding is not d or not d.open:
                raise Refused(StatusCode.FAILED_PRECONDITION, "the decode task was closed")
            d.answer, d.error = answer, (h.error or None)
            self.cond.notify_all()
        event(self.log, "decode_answered", round=d.round, key_holder=name,
              refused=bool(h.error))
        return pb.SubmitReply(accepted=True, message="decode answer accepted")

    def _chunks(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        for raw in frames:
            try:
                f = pb.ClientFrame.FromString(raw)
            except DecodeError as e:
                raise wire.BodyError(f"malformed chunk frame: {e}") from e
            if f.WhichOneof("frame") != "chunk":
                raise wire.BodyError("expected a chunk frame after the header")
            yield f.chunk

    def _validate(self, name: str, h: pb.UpdateHeader, body: bytes) -> Result:
        bad = {k: v for k, v in h.metrics.items() if not math.isfinite(v)}
        if bad:
            raise UpdateRejected(f"metrics {sorted(bad)} are NaN/Inf", client_id=name,
                                 stage="submit")
        if h.num_examples == 0:
            if body:
                raise UpdateRejected("a client with 0 examples must send an empty body",
                                     client_id=name, stage="submit")
            return Result(None, 0, dict(h.metrics), 0)
        payload = self.aggregator.loads(body)
        check = self.aggregator.aggregate({name: payload})
        if check.rejected:
            raise UpdateRejected(next(iter(check.rejected.values())), client_id=name,
                                 stage="aggregate")
        return Result(payload, int(h.num_examples), dict(h.metrics), len(body))
