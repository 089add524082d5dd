"""Scoring service over HTTPS: the model owner serves, the data owner scores a CSV.

Transport: HTTP/1.1 over TLS with the standard library (``http.server`` + ``ssl`` on the server,
``http.client`` on the client). HTTP rather than gRPC because a data owner's scoring job is a
batch client that may be written in any language: a POST of opaque bytes is reachable from
``curl`` or any HTTP library, needs no generated stubs, and has no dependency on the federated
deployment's gRPC services. Bodies are binary frames (``hefl.inference.wire``) and JSON; nothing
is ever pickled.

    GET    /v1/model                     -> JSON: model kind, features, CKKS parameters,
                                            preprocessing, records per batch
    POST   /v1/sessions                  body: evaluation-key bundle (no secret key)
                                         -> JSON {"session": id}      (once per session)
    POST   /v1/sessions/{id}/score       body: batch frame -> result frame (encrypted logits)
    DELETE /v1/sessions/{id}

Errors are JSON ``{"error": <hefl error class>, "message": ...}`` with a 4xx status.

``ScoringService`` is the transport-free core (sessions and evaluation), so tests and other
transports reuse it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import http.client
import json
import os
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from hefl import errors
from hefl.crypto.scoring import CkksParams, EvaluationKeys, Evaluator, Keyring, split_batches
from hefl.data.tabular import Preprocessor, read_csv
from hefl.errors import ConfigError, ContextMismatch, DataError, HeflError, TransportError
from hefl.inference.engine import evaluate, params_for
from hefl.inference.model import ModelFile, PolyMLP, sigmoid
from hefl.inference.wire import Batch

MAX_BODY = 512 * 1024 * 1024


class ScoringService:
    """Sessions (one per data owner's key) and batch evaluation; no I/O.

    Args:
        model_file: the model and its preprocessing.
        max_sessions: least recently used sessions beyond this are dropped.
        profile: CKKS parameter profile (``params_for``): ``"precise"`` or ``"fast"``.
    """

    def __init__(self, model_file: ModelFile, max_sessions: int = 32,
                 profile: str = "precise") -> None:
        self.model_file = model_file
        self.params = params_for(model_file.model, profile)
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Evaluator] = OrderedDict()
        self._lock = threading.Lock()

    def info(self) -> dict:
        m = self.model_file.model
        pre = self.model_file.preprocessing
        return {
            "kind": m.kind,
            "n_features": m.n_features,
            "needs_relin_keys": isinstance(m, PolyMLP),
            "ckks": self.params.to_dict(),
            "records_per_batch": self.params.records_per_ciphertext,
            "preprocessing": pre.to_dict() if pre is not None else None,
        }

    def open_session(self, bundle: bytes) -> str:
        """Register a data owner's evaluation keys; returns the session id.

        Raises:
            ContextMismatch: parameters differ from the ones this model needs.
            CryptoError: keys missing (the MLP needs relinearization keys).
        """
        keys = EvaluationKeys.loads(bundle)
        if keys.params != self.params:
            raise ContextMismatch(
                f"keys were made for {keys.params}, this model needs {self.params}; fetch "
                "/v1/model and generate keys with its 'ckks' parameters"
            )
        if isinstance(self.model_file.model, PolyMLP) and not keys.relin_keys:
            raise errors.CryptoError("this MLP needs relinearization keys in the bundle")
        evaluator = Evaluator(keys)
        sid = uuid.uuid4().hex
        with self._lock:
            self._sessions[sid] = evaluator
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return sid

    def close_session(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def score(self, sid: str, body: bytes) -> bytes:
        """Evaluate one batch frame; returns the result frame.

        Raises:
            ConfigError: unknown session.
            ContextMismatch: the batch was made under another key or parameters.
        """
        with self._lock:
            evaluator = self._sessions.get(sid)
            if evaluator is not None:
                self._sessions.move_to_end(sid)
        if evaluator is None:
            raise ConfigError(f"unknown or expired session {sid!r}; open a new one with "
                              "POST /v1/sessions")
        batch = Batch.loads(body)
        if batch.key_id != evaluator.keys.key_id:
            raise ContextMismatch(
                f"batch was encrypted under key {batch.key_id[:8]}..., session {sid[:8]}... "
                f"holds key {evaluator.keys.key_id[:8]}...; encrypt with this session's keys "
                "or open a new session"
            )
        if not 0 < batch.records <= self.params.records_per_ciphertext:
            raise ConfigError(f"batch declares {batch.records} records; 1 to "
                              f"{self.params.records_per_ciphertext} fit one batch")
        result = evaluate(evaluator, self.model_file.model, list(batch.blobs), batch.records)
        return Batch(batch.key_id, batch.records, (result,)).dumps()


# --------------------------------------------------------------------------- HTTP server


def _handler(service: ScoringService, log: Callable[[str], None]) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "hefl-infer/1"

        def log_message(self, format: str, *args) -> None:  # `format`: the stdlib's signature
            log(f"{self.address_string()} {format % args}")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _error(self, e: Exception) -> None:
            status = 404 if isinstance(e, ConfigError) and "session" in str(e) else 400
            if not isinstance(e, HeflError):
                status = 500
            self._json(status, {"error": type(e).__name__, "message": str(e)})

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                raise TransportError(f"request body of {n} bytes exceeds {MAX_BODY}; send "
                                     "smaller batches")
            return self.rfile.read(n)

        def _route(self) -> list[str]:
            return [p for p in urlparse(self.path).path.split("/") if p]

        def do_GET(self) -> None:
            if self._route() == ["v1", "model"]:
                self._json(200, service.info())
            else:
                self._json(404, {"error": "NotFound", "message": f"no route {self.path}"})

        def do_POST(self) -> None:
            route = self._route()
            try:
                body = self._body()
                if route == ["v1", "sessions"]:
                    self._json(200, {"session": service.open_session(body)})
                elif len(route) == 4 and route[:2] == ["v1", "sessions"] and route[3] == "score":
                    self._send(200, service.score(route[2], body), "application/octet-stream")
                else:
                    self._json(404, {"error": "NotFound", "message": f"no route {self.path}"})
            except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error reply
                self._error(e)

        def do_DELETE(self) -> None:
            route = self._route()
            if len(route) == 3 and route[:2] == ["v1", "sessions"]:
                service.close_session(route[2])
                self._json(200, {"closed": route[2]})
            else:
                self._json(404, {"error": "NotFound", "message": f"no route {self.path}"})

    return Handler


def make_server(
    service: ScoringService,
    certfile: str | Path,
    keyfile: str | Path,
    host: str = "127.0.0.1",
    port: int = 8443,
    log: Callable[[str], None] | None = None,
) -> ThreadingHTTPServer:
    """An HTTPS server for ``service`` (call ``serve_forever``; port 0 picks a free port)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(certfile), str(keyfile))
    try:
        server = ThreadingHTTPServer((host, port), _handler(service, log or (lambda _m: None)))
    except OSError as e:
        hint = ("another process is listening there (an earlier hefl infer serve?); pick "
                "another with --port N, or --port 0 for any free port"
                if e.errno == errno.EADDRINUSE else "check --host and --port")
        raise TransportError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from e
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return server


# --------------------------------------------------------------------------- HTTP client


class ScoringClient:
    """The data owner's connection to a scoring server (TLS, certificate verified).

    Args:
        url: ``https://host:port``.
        cafile: certificate (or CA) to trust, e.g. the server's self-signed ``cert.pem``.
        timeout: seconds per request.
    """

    def __init__(self, url: str, cafile: str | Path | None = None, timeout: float = 300) -> None:
        u = urlparse(url)
        if u.scheme != "https" or not u.hostname:
            raise ConfigError(f"server URL must be https://host:port, got {url!r}")
        self.host, self.port = u.hostname, u.port or 443
        self.ssl = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl,
                                           timeout=self.timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"{method} https://{self.host}:{self.port}{path} failed: {e}; "
                                 "is the server running and its certificate trusted?") from e
        finally:
            conn.close()
        if resp.status != 200:
            try:
                err = json.loads(data)
                cls = getattr(errors, err.get("error", ""), None)
                msg = err.get("message", "")
            except ValueError:
                cls, msg = None, data[:200].decode(errors="replace")
            if isinstance(cls, type) and issubclass(cls, HeflError):
                raise cls(f"server: {msg}")
            raise TransportError(f"server answered {resp.status}: {msg}")
        return data

    def info(self) -> dict:
        return json.loads(self._request("GET", "/v1/model"))

    def open_session(self, keys: EvaluationKeys) -> str:
        return json.loads(self._request("POST", "/v1/sessions", keys.dumps()))["session"]

    def score(self, session: str, batch: Batch) -> Batch:
        return Batch.loads(self._request("POST", f"/v1/sessions/{session}/score", batch.dumps()))

    def close_session(self, session: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session}")


@dataclass(frozen=True)
class ScoreSummary:
    """What ``score_csv`` did."""

    rows: int
    scored: int
    skipped: int
    batches: int
    unknown_categories: dict[str, int]
    seconds: float


def _rows_done(out: Path) -> int:
    """Rows already scored in ``out``; a torn last line (crash mid-write) is cut off."""
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    if lines[0].strip() != b"row,logit,probability":
        raise DataError(f"{out} is not a hefl scores file; remove it or choose another --out")
    keep, done = len(lines[0]) + 1, 0
    for line in lines[1:]:
        parts = line.split(b",")
        if len(parts) != 3 or parts[0] != str(done).encode():
            break
        keep += len(line) + 1
        done += 1
    if keep < len(raw):
        with open(out, "r+b") as f:
            f.truncate(min(keep, len(raw)))
    return done


def score_csv(
    client: ScoringClient,
    data: str | Path,
    out: str | Path,
    sep: str = ",",
    batch_size: int | None = None,
    resume: bool = False,
    keyring: Keyring | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreSummary:
    """Data owner: preprocess ``data`` with the server's shipped preprocessing, encrypt, score,
    decrypt and append ``row,logit,probability`` to ``out`` after every batch (flushed), so an
    interruption loses nothing already scored; ``resume=True`` continues after the rows already
    in ``out``.

    Raises:
        DataError: bad CSV (missing columns, NaN, ...): raised before anything is sent.
        ContextMismatch / TransportError: from the server; rows scored so far stay in ``out``.
    """
    t0 = time.perf_counter()
    info = client.info()
    if info.get("preprocessing") is None:
        raise ConfigError("the server's model ships no preprocessing; score preprocessed "
                          "features with hefl.inference.engine instead")
    pre = Preprocessor.from_dict(info["preprocessing"])
    x, unknown = pre.transform_report(read_csv(data, sep=sep))
    out = Path(out)
    done = 0
    if out.exists():
        if not resume:
            raise DataError(f"{out} exists; pass --resume to continue it or choose another --out")
        done = _rows_done(out)
        if done > len(x):
            raise DataError(f"{out} already holds {done} scores but {data} has {len(x)} rows; "
                            "it belongs to another data file")
    if keyring is None:  # the parameters are re-checked for 128-bit security here
        keyring = Keyring.generate(CkksParams.from_dict(info["ckks"]),
                                   relin=bool(info["needs_relin_keys"]))
    session = client.open_session(keyring.evaluation_keys())
    cap = min(batch_size or info["records_per_batch"], keyring.params.records_per_ciphertext)
    batches = 0
    try:
        with open(out, "a", newline="") as f:
            w = csv.writer(f)
            if done == 0:
                w.writerow(["row", "logit", "probability"])
            for rows in split_batches(len(x) - done, cap):
                sl = slice(rows.start + done, rows.stop + done)
                n = sl.stop - sl.start
                k = 1 if info["needs_relin_keys"] else keyring.blocks_for(n, x.shape[1])
                blobs = keyring.encrypt_batch(x[sl], blocks=k)
                reply = client.score(session, Batch(keyring.key_id, sl.stop - sl.start,
                                                     tuple(blobs)))
                if len(reply.blobs) != 1:
                    raise TransportError(f"server returned {len(reply.blobs)} results, expected 1")
                z = keyring.decrypt_scores(reply.blobs[0], n, k)
                p = sigmoid(z)
                w.writerows([i, f"{zi:.9g}", f"{pi:.9g}"] for i, zi, pi in
                            zip(range(sl.start, sl.stop), z, p, strict=True))
                f.flush()
                os.fsync(f.fileno())
                batches += 1
                if progress:
                    progress(sl.stop, len(x))
    finally:
        with contextlib.suppress(HeflError):
            client.close_session(session)
    return ScoreSummary(len(x), len(x) - done, done, batches, unknown, time.perf_counter() - t0)


def serve_forever(server: ThreadingHTTPServer) -> None:
    """Run until interrupted (Ctrl-C)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
