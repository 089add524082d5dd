"""The scoring service over HTTPS, for callers that may be hostile.

    GET    /v1/model                     -> JSON: model kind, feature names in order, CKKS
                                            parameters, records per batch (no training
                                            statistics unless the owner publishes them)
    POST   /v1/sessions                  body: evaluation-key bundle -> {"session": id}
    POST   /v1/sessions/{id}/score       body: batch frame -> result frame (encrypted logits)
    DELETE /v1/sessions/{id}

Every request carries ``Authorization: Bearer NAME:SECRET`` (``hefl.inference.callers``).
Errors are JSON ``{"error": class, "code": status name, "message": ...}`` with 401 (no or wrong
token), 403 (revoked, someone else's certificate), 404, 411/400/413 (missing, malformed or
oversized ``Content-Length``), 429 (budget spent; ``Retry-After``) or 503 (busy).

A connection goes through these steps, each bounded, so that no caller (authenticated or
not) can hold what an honest caller needs:

1. The accept loop only accepts. A new connection waits in the *lobby* (one ``selectors``
   loop, no thread per connection) until its first byte arrives, for at most
   ``handshake_timeout_s``; at most ``pending`` wait there (the oldest goes first). Idle
   connections cost a file descriptor, not a thread.
2. A connection thread (at most ``connections``; beyond that the connection is closed at once)
   runs the TLS handshake and reads the request head under one deadline from accept
   (``handshake_timeout_s + header_timeout_s``) that a client sending one byte at a time
   cannot stretch: a reaper shuts the socket down when it passes.
3. The caller is authenticated and charged one request, and ``Content-Length`` is checked
   against a cap sized to the model (``ScoringService.body_cap``), all before one byte of
   the body is read.
4. The body is read under a deadline sized to its length (``min_rate_bytes_s``).
5. The evaluation (CPU-bound) runs with at most ``evaluations`` at once; a batch is charged the
   records it can carry first. One request per connection (``Connection: close``).

Why the standard library's ``http.server`` and not an ASGI server (uvicorn) or gRPC: a data
owner's scoring job must be reachable from ``curl`` or any HTTP library (so not gRPC), and
uvicorn would give steps 1 and 2 only in part (its TLS handshake timeout is asyncio's fixed
60 s, it has no deadline on a request head, its ``limit_concurrency`` counts idle
connections and so turns a flood of them into 503s for honest callers) and none of steps 3-5
(no body cap, no authentication, no budgets, and the evaluation would still need a bounded
pool). The limits are what we would write either way; the HTTP parsing stays a maintained
component, with no new dependency.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hefl.errors import ConfigError, HeflError, QuotaExceeded, Refused, TransportError
from hefl.inference.callers import Caller, Callers, Quotas
from hefl.inference.service import ScoringService

#: HTTP status of each refusal code (gRPC's names, as ``Refused`` carries them).
STATUS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
          "LENGTH_REQUIRED": 411, "TOO_LARGE": 413, "RESOURCE_EXHAUSTED": 429,
          "UNAVAILABLE": 503, "INVALID_ARGUMENT": 400}
CODE = {v: k for k, v in STATUS.items()}


@dataclass(frozen=True)
class Limits:
    """Bounds on what callers can hold (see the module docstring for where each applies).

    Attributes:
        evaluations: batches evaluated at once (CPU-bound: about the cores to spare).
        connections: connection threads (TLS, request head, body, reply).
        pending: connections waiting in the lobby for their first byte.
        handshake_timeout_s: from accept to the first byte, and again for the handshake.
        header_timeout_s: from the end of the handshake deadline to the end of the head.
        min_rate_bytes_s: a body or reply of n bytes gets ``header_timeout_s + n / rate``.
        queue_timeout_s: how long a request waits for a free worker before a 503.
    """

    evaluations: int = 2
    connections: int = 64
    pending: int = 1024
    handshake_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    min_rate_bytes_s: int = 1 << 20
    queue_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for k in ("evaluations", "connections", "pending", "min_rate_bytes_s"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")
        for k in ("handshake_timeout_s", "header_timeout_s", "queue_timeout_s"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)!r}")


class _Reply(Exception):
    """An HTTP-level refusal (status, code, message)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Reaper:
    """Shuts down connections whose deadline passed (a blocked read then returns at once).

    It holds a duplicate of each watched socket, so the descriptor it acts on is never one
    the connection thread has closed and the system has reused."""

    def __init__(self, tick: float = 0.1) -> None:
        self._lock = threading.Lock()
        self._watch: dict[int, tuple[socket.socket, float]] = {}
        self._stop = threading.Event()
        self._tick = tick
        threading.Thread(target=self._run, name="hefl-infer-reaper", daemon=True).start()

    def watch(self, sock: socket.socket, deadline: float) -> int:
        dup = sock.dup()
        with self._lock:
            self._watch[dup.fileno()] = (dup, deadline)
        return dup.fileno()

    def extend(self, key: int, deadline: float) -> None:
        with self._lock:
            if key in self._watch:
                self._watch[key] = (self._watch[key][0], deadline)

    def forget(self, key: int) -> None:
        with self._lock:
            dup, _ = self._watch.pop(key, (None, 0.0))
        if dup is not None:
            dup.close()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                late = [k for k, (_, d) in self._watch.items() if d < now]
                for k in late:
                    with contextlib.suppress(OSError):
                        self._watch[k][0].shutdown(socket.SHUT_RDWR)
                    self._watch[k] = (self._watch[k][0], float("inf"))

    def stop(self) -> None:
        self._stop.set()


class _Lobby:
    """Connections that have not sent a byte yet: one selector, no thread each."""

    def __init__(self, limit: int, timeout: float,
                 dispatch: Callable[[socket.socket, tuple, float], None]) -> None:
        self.limit, self.timeout, self.dispatch = limit, timeout, dispatch
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._new: deque[tuple[socket.socket, tuple, float]] = deque()
        self._waiting: dict[socket.socket, tuple[tuple, float]] = {}
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hefl-infer-lobby", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, addr: tuple) -> None:
        with self._lock:
            self._new.append((sock, addr, time.monotonic()))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _admit(self) -> None:
        with self._lock:
            new, self._new = list(self._new), deque()
        for sock, addr, t in new:
            if len(self._waiting) >= self.limit:  # full: the oldest waiter makes room
                oldest = min(self._waiting, key=lambda s: self._waiting[s][1])
                self._drop(oldest)
            self._sel.register(sock, selectors.EVENT_READ)
            self._waiting[sock] = (addr, t)

    def _drop(self, sock: socket.socket) -> None:
        self._sel.unregister(sock)
        del self._waiting[sock]
        sock.close()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(timeout=0.25):
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    self._admit()
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock not in self._waiting:
                    continue
                addr, t = self._waiting.pop(sock)
                self._sel.unregister(sock)
                self.dispatch(sock, addr, t)
            cutoff = time.monotonic() - self.timeout
            for sock in [s for s, (_, t) in self._waiting.items() if t < cutoff]:
                self._drop(sock)
        for sock in list(self._waiting):
            self._drop(sock)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout=2)
        self._wake_r.close()
        self._wake_w.close()


class ScoringServer(socketserver.TCPServer):
    """HTTPS front of a ``ScoringService`` (``serve_forever`` / ``shutdown`` /
    ``server_close`` as for any ``socketserver`` server); build it with ``make_server``."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: ScoringService, callers: Callers,
                 quotas: Quotas, ctx: ssl.SSLContext, limits: Limits,
                 log: Callable[[str], None]) -> None:
        super().__init__(address, _Handler)
        self.service, self.callers, self.quotas = service, callers, quotas
        self.ctx, self.limits, self.log = ctx, limits, log
        self.cpu = threading.BoundedSemaphore(limits.evaluations)
        self.local = threading.local()
        self._active = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(limits.connections, thread_name_prefix="hefl-infer")
        self._reaper = _Reaper()
        self._lobby = _Lobby(limits.pending, limits.handshake_timeout_s, self._dispatch)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        self._lobby.add(request, client_address)  # the accept loop does nothing else

    def _dispatch(self, sock: socket.socket, addr: tuple, accepted: float) -> None:
        with self._lock:
            busy = self._active >= self.limits.connections
            if not busy:
                self._active += 1
        if busy:
            sock.close()
            self.log(f"{addr[0]} refused: {self.limits.connections} connections busy")
            return
        self._pool.submit(self._connection, sock, addr, accepted)

    def _connection(self, sock: socket.socket, addr: tuple, accepted: float) -> None:
        lim = self.limits
        key, tls = None, None
        try:  # everything, the reaper's dup() included: a failure must still free the slot
            key = self._reaper.watch(sock, accepted + lim.handshake_timeout_s
                                     + lim.header_timeout_s)
            self.local.deadline = lambda d: self._reaper.extend(key, d)
            sock.settimeout(lim.handshake_timeout_s + lim.header_timeout_s)
            tls = self.ctx.wrap_socket(sock, server_side=True)
            _Handler(tls, addr, self)
        except (OSError, ssl.SSLError, ValueError):
            pass  # a failed handshake, a reaped or reset connection: nothing to answer
        finally:
            if key is not None:
                self._reaper.forget(key)
            with contextlib.suppress(OSError):
                (tls or sock).close()
            with self._lock:
                self._active -= 1

    def server_close(self) -> None:
        if hasattr(self, "_lobby"):  # not when binding failed in __init__
            self._lobby.stop()
            self._reaper.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().server_close()


def _int(digits: str) -> int:
    """A decimal string of ASCII digits as an int; past 18 digits (beyond any cap, and past
    what ``int()`` converts without a limit) a number larger than every cap."""
    digits = digits.strip()
    return int(digits) if len(digits) <= 18 else 1 << 62


def _cert_names(conn: socket.socket) -> list[str]:
    if not isinstance(conn, ssl.SSLSocket):
        return []
    subject: Any = (conn.getpeercert() or {}).get("subject", ())
    return [str(v) for rdn in subject for k, v in rdn if k == "commonName"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hefl-infer/2"
    server: ScoringServer

    def handle(self) -> None:
        self.close_connection = True
        self._body_read = False
        self.handle_one_request()  # one request per connection
        if getattr(self, "command", None) in ("POST", "PUT") and not self._body_read:
            self._linger()

    def _linger(self) -> None:
        """After refusing a request whose body was not read, discard what the client is
        still sending (at most 4 MiB, at most 1 s) so that closing does not reset the
        connection before the client has read the refusal."""
        headers = getattr(self, "headers", None)
        raw = (headers.get("Content-Length") or "").strip() if headers else ""
        left = min(_int(raw) if raw.isascii() and raw.isdigit() else 4 << 20, 4 << 20)
        self.server.local.deadline(time.monotonic() + 1.0)
        with contextlib.suppress(OSError, ValueError):
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def log_message(self, format: str, *args) -> None:  # `format`: the stdlib's signature
        self.server.log(f"{self.address_string()} {format % args}")

    def _deadline(self, nbytes: int) -> None:
        lim = self.server.limits
        self.server.local.deadline(time.monotonic() + lim.header_timeout_s
                                   + nbytes / lim.min_rate_bytes_s)

    def _send(self, status: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        self._deadline(len(body))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _fail(self, e: Exception) -> None:
        headers: dict[str, str] = {}
        if isinstance(e, _Reply):
            status, name, code, msg, headers = e.status, "Refused", CODE[e.status], e.message, \
                e.headers
        elif isinstance(e, Refused):
            status, name, code, msg = STATUS.get(e.code, 400), type(e).__name__, e.code, e.reason
            if isinstance(e, QuotaExceeded):
                headers = {"Retry-After": str(e.retry_after_s)}
            elif e.code == "UNAUTHENTICATED":
                headers = {"WWW-Authenticate": 'Bearer realm="hefl-infer"'}
        elif isinstance(e, ConfigError) and "session" in str(e):
            status, name, code, msg = 404, type(e).__name__, "NOT_FOUND", str(e)
        elif isinstance(e, HeflError):
            status, name, code, msg = 400, type(e).__name__, "INVALID_ARGUMENT", str(e)
        else:
            self.server.log(f"{self.address_string()} internal error: {e!r}")
            status, name, code, msg = 500, "HeflError", "INTERNAL", "internal error; see the " \
                "server log"
        if status in (401, 403, 429):
            self.server.log(f"{self.address_string()} {self.command} {self.path}: {status} {msg}")
        self._json(status, {"error": name, "code": code, "message": msg}, headers)

    def _length(self, cap: int) -> int:
        """The declared body length, refused before reading when missing, malformed, or over
        ``cap``."""
        if self.headers.get("Transfer-Encoding"):
            raise _Reply(411, "chunked bodies are not accepted; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _Reply(411, "Content-Length required")
        if len(values) > 1 or not values[0].strip().isascii() or not values[0].strip().isdigit():
            raise _Reply(400, f"Content-Length must be one non-negative integer, got "
                         f"{values!r}")
        n = _int(values[0])
        if n > cap:
            raise _Reply(413, f"request body of {n} bytes exceeds this model's limit of {cap}; "
                         "send smaller batches (one ciphertext's worth of records or fewer)")
        return n

    def _body(self, cap: int) -> bytes:
        n = self._length(cap)
        self._deadline(n)
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) != n:
            raise _Reply(400, f"body ended after {len(data)} of {n} bytes")
        return data

    def _serve(self, route: Callable[[list[str], Caller], None]) -> None:
        try:
            caller = self.server.callers.authenticate(self.headers.get("Authorization"),
                                                      _cert_names(self.connection))
            self.server.quotas.charge_request(caller)
            route([p for p in urlparse(self.path).path.split("/") if p], caller)
        except (OSError, ssl.SSLError):
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error reply
            self._fail(e)

    def _work(self, fn: Callable[[], bytes | str]):
        """Run ``fn`` in one of the ``evaluations`` slots (503 when none frees up in time)."""
        # waiting for a slot and evaluating are the server's time, not the caller's: no
        # deadline (the body is in; the reply gets its own deadline in _send)
        self.server.local.deadline(float("inf"))
        if not self.server.cpu.acquire(timeout=self.server.limits.queue_timeout_s):
            raise _Reply(503, f"all {self.server.limits.evaluations} evaluation slots busy for "
                         f"{self.server.limits.queue_timeout_s:.0f} s; retry later")
        try:
            return fn()
        finally:
            self.server.cpu.release()

    def do_GET(self) -> None:
        def route(r: list[str], caller: Caller) -> None:
            if r != ["v1", "model"]:
                raise _Reply(404, f"no route GET {self.path}")
            self._json(200, self.server.service.info())

        self._serve(route)

    def do_POST(self) -> None:
        svc = self.server.service

        def route(r: list[str], caller: Caller) -> None:
            if r == ["v1", "sessions"]:
                body = self._body(svc.body_cap("keys"))
                sid = self._work(lambda: svc.open_session(body, owner=caller.name))
                self._json(200, {"session": sid})
            elif len(r) == 4 and r[:2] == ["v1", "sessions"] and r[3] == "score":
                body = self._body(svc.body_cap("batch"))
                out = self._work(lambda: svc.score(
                    r[2], body, owner=caller.name,
                    charge=lambda n: self.server.quotas.charge_records(caller, n)))
                self._send(200, out, "application/octet-stream")  # type: ignore[arg-type]
            else:
                raise _Reply(404, f"no route POST {self.path}")

        self._serve(route)

    def do_DELETE(self) -> None:
        def route(r: list[str], caller: Caller) -> None:
            if len(r) != 3 or r[:2] != ["v1", "sessions"]:
                raise _Reply(404, f"no route DELETE {self.path}")
            self.server.service.close_session(r[2], owner=caller.name)
            self._json(200, {"closed": r[2]})

        self._serve(route)


def make_server(
    service: ScoringService,
    certfile: str | Path,
    keyfile: str | Path,
    callers: Callers | str | Path,
    host: str = "127.0.0.1",
    port: int = 8443,
    *,
    quotas: Quotas | None = None,
    client_ca: str | Path | None = None,
    limits: Limits | None = None,
    log: Callable[[str], None] | None = None,
) -> ScoringServer:
    """An HTTPS server for ``service`` (call ``serve_forever``; port 0 picks a free port).

    Args:
        callers: the callers file (or a loaded ``Callers``): who may call, with what token.
        quotas: budgets and their ledger (default: ``Budget()`` for everyone, no ledger).
        client_ca: require a client certificate from this CA (mTLS) whose common name is the
            caller's name.
        limits: connection, time and worker bounds (``Limits()``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
        if client_ca is not None:
            ctx.load_verify_locations(str(client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files ({certfile}, {keyfile}"
                          f"{', ' + str(client_ca) if client_ca else ''}): {e}") from e
    if not isinstance(callers, Callers):
        callers = Callers(callers, require_cert=client_ca is not None)
    try:
        return ScoringServer((host, port), service, callers, quotas or Quotas(), ctx,
                             limits or Limits(), log or (lambda _m: None))
    except OSError as e:
        hint = ("another process is listening there (an earlier hefl infer serve?); pick "
                "another with --port N, or --port 0 for any free port"
                if e.errno == errno.EADDRINUSE else "check --host and --port")
        raise TransportError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from e


def serve_forever(server: ScoringServer) -> None:
    """Run until interrupted (Ctrl-C)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
