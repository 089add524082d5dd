"""The coordinator served over gRPC: authentication from metadata and TLS, framing of chunked
streams, and status codes. No round policy lives here (``hefl.net.coordinator`` has it all).

    Join(JoinRequest) -> JoinReply              coordinator.join
    Subscribe(SubscribeRequest) -> stream       coordinator.subscribe / next_task / disconnect
    Submit(stream ClientFrame) -> SubmitReply   coordinator.submit (header, then chunks)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hefl.errors import Refused, TransportError
from hefl.history import History
from hefl.net import wire
from hefl.net.config import RunConfig
from hefl.net.coordinator import Clock, Coordinator, parse
from hefl.net.logs import event
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.store import write_atomic


def _abort(context: grpc.ServicerContext, e: Refused) -> Any:
    context.abort(getattr(grpc.StatusCode, e.code), e.reason)


class StreamSlots:
    """At most ``cap`` open streams of one kind per identity: a client that opens more is
    refused RESOURCE_EXHAUSTED at once, so one token cannot hold the server's threads."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, name: str, kind: str) -> Iterator[None]:
        with self._lock:
            if self._open[name, kind] >= self.cap:
                raise Refused("RESOURCE_EXHAUSTED",
                              f"{name!r} already has {self.cap} open {kind} streams; wait for "
                              "them to end")
            self._open[name, kind] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[name, kind] -= 1


@contextlib.contextmanager
def deadline(context: grpc.ServicerContext, seconds: float) -> Iterator[None]:
    """Cancel the RPC if this block takes longer than ``seconds`` (a blocked read of the
    client's stream then raises, and the handler's thread is free again)."""
    timer = threading.Timer(seconds, context.cancel)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class GrpcService:
    """gRPC handlers over one ``Coordinator``."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        s = coordinator.cfg.server
        self.slots = StreamSlots(s.streams_per_client)
        self.first_frame_s = s.first_frame_timeout_s
        # a whole Submit: the round's own deadline bounds an honest one
        self.message_s = max(s.round_timeout_s, s.first_frame_timeout_s) + 60.0

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "Join": grpc.unary_unary_rpc_method_handler(
                    self._guard(self._join), response_serializer=pb.JoinReply.SerializeToString
                ),
                "Subscribe": grpc.unary_stream_rpc_method_handler(
                    self._subscribe, response_serializer=pb.ServerFrame.SerializeToString
                ),
                "Submit": grpc.stream_unary_rpc_method_handler(
                    self._guard(self._submit),
                    response_serializer=pb.SubmitReply.SerializeToString,
                ),
            },
        )

    @staticmethod
    def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Turn ``Refused`` into a gRPC status; nothing crashes the server."""

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(request, context)
            except Refused as e:
                return _abort(context, e)

        return wrapper

    def _auth(self, context: grpc.ServicerContext) -> str:
        try:
            token = wire.token_from_metadata(context.invocation_metadata())
        except TransportError as e:
            raise Refused("UNAUTHENTICATED", str(e)) from e
        cns = [c.decode() for c in context.auth_context().get("x509_common_name", [])]
        return self.c.authenticate(token, cns, peer=context.peer())

    def _join(self, raw: bytes, context: grpc.ServicerContext) -> pb.JoinReply:
        name = self._auth(context)
        return self.c.join(name, parse(pb.JoinRequest, raw, "JoinRequest"), peer=context.peer())

    def _subscribe(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.ServerFrame]:
        slot = contextlib.ExitStack()
        try:
            name = self._auth(context)
            slot.enter_context(self.slots.take(name, "Subscribe"))
            sess = self.c.subscribe(name, parse(pb.SubscribeRequest, raw, "SubscribeRequest"))
        except Refused as e:
            slot.close()
            _abort(context, e)
            return
        context.add_callback(lambda: self.c.disconnect(sess, "stream closed"))
        with slot:
            try:
                while context.is_active():
                    item = self.c.next_task(sess)
                    if item is None:
                        return
                    header, body = item
                    yield from wire.server_frames(header, body)
                    if header.kind == pb.TASK_DONE:
                        return
            finally:
                self.c.disconnect(sess, "stream closed")

    def _submit(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> pb.SubmitReply:
        name = self._auth(context)
        with self.slots.take(name, "Submit"), deadline(context, self.message_s):
            with deadline(context, self.first_frame_s):  # the header comes first, and soon
                first = next(iter(frames), None)
            if first is None:
                raise Refused("INVALID_ARGUMENT", "empty submission: send a header frame")
            frame = parse(pb.ClientFrame, first, "frame")
            if frame.WhichOneof("frame") != "header":
                raise Refused("INVALID_ARGUMENT", "the first frame must be a header")
            return self.c.submit(name, frame.header, _chunks(frames))


def _chunks(frames: Iterator[bytes]) -> Iterator[bytes]:
    for raw in frames:
        try:
            f = pb.ClientFrame.FromString(raw)
        except DecodeError as e:
            raise wire.BodyError(f"malformed chunk frame: {e}") from e
        if f.WhichOneof("frame") != "chunk":
            raise wire.BodyError("expected a chunk frame after the header")
        yield f.chunk


class FederationServer:
    """A coordinator served over gRPC + TLS: what ``hefl server`` runs.

    Example:
        >>> srv = FederationServer(load_config("run.toml"))   # doctest: +SKIP
        >>> srv.start(); srv.run(); srv.stop()                 # doctest: +SKIP
    """

    def __init__(
        self, cfg: RunConfig, log: logging.Logger | None = None, clock: Clock | None = None,
        coordinator_class: type[Coordinator] = Coordinator,
    ) -> None:
        self.coordinator = coordinator_class(cfg, log=log, clock=clock)
        self.cfg = cfg
        self.log = self.coordinator.log
        self._grpc: grpc.Server | None = None
        self.port = 0

    @property
    def run_id(self) -> str:
        return self.coordinator.run_id

    @property
    def store(self) -> Any:
        return self.coordinator.store

    def start(self) -> int:
        """Bind and start serving; returns the port (useful with address ``HOST:0``)."""
        # each identity holds at most streams_per_client Subscribe and Submit streams and a
        # Join; beyond the pool, calls are refused (RESOURCE_EXHAUSTED), never queued
        n = len(self.cfg.clients)
        workers = (2 * self.cfg.server.streams_per_client + 1) * n + 16
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hefl-rpc"),
            maximum_concurrent_rpcs=workers,
            options=wire.GRPC_OPTIONS + [
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail
                # clients ping every keepalive_time_ms: allow it rather than answer GOAWAY
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ],
        )
        server.add_generic_rpc_handlers((GrpcService(self.coordinator).handlers(),))
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
        self.coordinator.lock.set_address(f"{host}:{self.port}")  # HOST:0 has its port now
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

    def run(self) -> History:
        return self.coordinator.run()

    def request_stop(self) -> None:
        self.coordinator.request_stop()

    def stop(self, grace: float = 1.0) -> None:
        self.coordinator.request_stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        self.coordinator.close()
