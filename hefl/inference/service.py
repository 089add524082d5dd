"""The scoring service's core (sessions, evaluation, budgets charged) and the data owner's
client; the HTTPS front is ``hefl.inference.server``.

``ScoringService`` has no I/O, so tests and other transports reuse it. Sessions belong to the
caller that opened them: another caller's session id is as unknown as a made-up one.

``ScoringClient`` speaks to the server over TLS (the server's certificate verified; a client
certificate for mTLS optional) with a bearer token; ``score_csv`` is the data owner's batch job.
Bodies are binary frames (``hefl.inference.wire``) and JSON; nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import json
import math
import os
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from hefl import errors
from hefl.crypto.scoring import CkksParams, EvaluationKeys, Evaluator, Keyring, split_batches
from hefl.data.tabular import Preprocessor, Table, read_csv
from hefl.errors import (
    ConfigError,
    ContextMismatch,
    DataError,
    HeflError,
    QuotaExceeded,
    Refused,
    TransportError,
)
from hefl.inference.engine import evaluate, params_for
from hefl.inference.model import ModelFile, PolyMLP, sigmoid
from hefl.inference.wire import Batch
from hefl.net.wire import Token

#: Bound on the serialized evaluation keys' headroom beyond the key-switching keys.
KEYS_SLACK = 1 << 20


class ScoringService:
    """Sessions (one per data owner's key, owned by the caller that opened it) and batch
    evaluation; no I/O.

    Args:
        model_file: the model and its preprocessing.
        max_sessions: least recently used sessions beyond this are dropped.
        sessions_per_caller: a caller's own least recently used session goes beyond this, so
            no caller can push out another's.
        profile: CKKS parameter profile (``params_for``): ``"precise"`` or ``"fast"``.
        publish_preprocessing: ``info`` includes the preprocessing statistics (training means
            and standard deviations). Off by default: they describe the training data, and a
            data owner can be given the preprocessing file directly
            (``hefl infer export-preprocessing``).
    """

    def __init__(self, model_file: ModelFile, max_sessions: int = 32,
                 profile: str = "precise", sessions_per_caller: int = 4,
                 publish_preprocessing: bool = False, workers: int = 1) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.model_file = model_file
        self.workers = workers
        self.params = params_for(model_file.model, profile)
        self.max_sessions = max_sessions
        self.sessions_per_caller = sessions_per_caller
        self.publish_preprocessing = publish_preprocessing
        self._sessions: OrderedDict[str, tuple[str, Evaluator]] = OrderedDict()
        self._lock = threading.Lock()
        self._busy: dict[int, threading.Lock] = {}  # one batch at a time per helper pool

    def info(self) -> dict:
        """What a data owner needs to encrypt: the model kind, its features in order, the CKKS
        parameters and batch size; training statistics only when ``publish_preprocessing``."""
        m = self.model_file.model
        pre = self.model_file.preprocessing
        info = {
            "kind": m.kind,
            "n_features": m.n_features,
            "features": list(pre.feature_names) if pre is not None else None,
            "needs_relin_keys": isinstance(m, PolyMLP),
            "ckks": self.params.to_dict(),
            "records_per_batch": self.params.records_per_ciphertext,
        }
        if self.publish_preprocessing and pre is not None:
            info["preprocessing"] = pre.to_dict()
        return info

    def body_cap(self, what: str) -> int:
        """Largest request body this model can need: ``"batch"`` (one ciphertext per feature,
        unseeded, at every data prime) or ``"keys"`` (relinearization and Galois keys); any
        larger ``Content-Length`` is refused before reading."""
        p = self.params
        n, primes = p.poly_modulus_degree, len(p.coeff_mod_bit_sizes)
        ciphertext = 2 * n * (primes - 1) * 8 + 4096
        if what == "batch":
            return 64 + self.model_file.model.n_features * (ciphertext + 4)
        switch_key = (primes - 1) * 2 * n * primes * 8
        return (2 + 2 * int(math.log2(n))) * switch_key + KEYS_SLACK

    def open_session(self, bundle: bytes, owner: str = "") -> str:
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
        # helpers share logistic-regression batches only; the MLP is evaluated in this process
        evaluator = Evaluator(keys, workers=1 if isinstance(self.model_file.model, PolyMLP)
                              else self.workers)
        sid = uuid.uuid4().hex
        gone = []
        with self._lock:
            mine = [k for k, (o, _) in self._sessions.items() if o == owner]
            for k in mine[: max(0, len(mine) + 1 - self.sessions_per_caller)]:
                gone.append(self._sessions.pop(k)[1])
            self._sessions[sid] = (owner, evaluator)
            self._busy[id(evaluator)] = threading.Lock()
            while len(self._sessions) > self.max_sessions:
                gone.append(self._sessions.popitem(last=False)[1][1])
        for ev in gone:
            self._retire(ev)
        return sid

    def _retire(self, evaluator: Evaluator) -> None:
        """Stop a dropped session's helper processes (after a batch it is evaluating)."""
        with self._lock:
            busy = self._busy.pop(id(evaluator), None)
        if busy is None:
            return
        with busy:
            evaluator.close()

    def close(self) -> None:
        """Drop every session and stop their helper processes."""
        with self._lock:
            evaluators = [ev for _, ev in self._sessions.values()]
            self._sessions.clear()
        for ev in evaluators:
            self._retire(ev)

    def _session(self, sid: str, owner: str) -> Evaluator | None:
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None or entry[0] != owner:
                return None  # another caller's session is as unknown as a made-up one
            self._sessions.move_to_end(sid)
            return entry[1]

    def close_session(self, sid: str, owner: str = "") -> None:
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None or entry[0] != owner:
                return
            del self._sessions[sid]
        self._retire(entry[1])

    def charge_for(self, batch: Batch) -> int:
        """Records a batch is charged: all it can carry. Every slot of a ciphertext is scored
        and returned, whatever the batch declares, so each is a query to the model."""
        from hefl.crypto.scoring import feature_blocks
        from hefl.inference.model import LinearModel

        cap = self.params.records_per_ciphertext
        if isinstance(self.model_file.model, LinearModel):
            k = feature_blocks(batch.records, self.model_file.model.n_features, self.params)
            return cap // k
        return cap

    def score(self, sid: str, body: bytes, owner: str = "",
              charge: Callable[[int], None] | None = None) -> bytes:
        """Evaluate one batch frame; returns the result frame. ``charge`` is called with the
        batch's records (``charge_for``) after the batch is checked and before it is
        evaluated; it refuses by raising.

        Raises:
            ConfigError: unknown session (or another caller's).
            ContextMismatch: the batch was made under another key or parameters.
        """
        evaluator = self._session(sid, owner)
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
        if charge is not None:
            charge(self.charge_for(batch))
        with self._lock:
            busy = self._busy.get(id(evaluator))
        if busy is None:  # dropped since it was looked up
            raise ConfigError(f"unknown or expired session {sid!r}; open a new one with "
                              "POST /v1/sessions")
        with busy:
            result = evaluate(evaluator, self.model_file.model, list(batch.blobs),
                              batch.records)
        return Batch(batch.key_id, batch.records, (result,)).dumps()


# --------------------------------------------------------------------------- HTTP client


class ScoringClient:
    """The data owner's connection to a scoring server (TLS, the server certificate verified).

    Args:
        url: ``https://host:port``.
        cafile: certificate (or CA) to trust: the CA's ``ca.pem`` from ``hefl certs``, or a
            self-signed server's ``cert.pem``.
        token: the caller's token ``NAME:SECRET`` (a ``Token``, the text, or ``token_file``).
        token_file: file holding the token (``certs/clients/NAME.token`` from ``hefl certs``).
        cert, key: client certificate and key, for a server that requires mTLS.
        timeout: seconds per request.
    """

    def __init__(self, url: str, cafile: str | Path | None = None, *,
                 token: str | Token | None = None, token_file: str | Path | None = None,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 timeout: float = 300) -> None:
        u = urlparse(url)
        if u.scheme != "https" or not u.hostname:
            raise ConfigError(f"server URL must be https://host:port, got {url!r}")
        self.host, self.port = u.hostname, u.port or 443
        self.ssl = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        if (cert is None) != (key is None):
            raise ConfigError("give both --cert and --key for a client certificate, or neither")
        if cert is not None:
            try:
                self.ssl.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"cannot load client certificate {str(cert)!r} / key "
                                  f"{str(key)!r}: {e}") from e
        self.token = _token(token, token_file)
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ssl,
                                           timeout=self.timeout)
        headers = {"Content-Type": "application/octet-stream"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=body if body is not None or method != "POST"
                         else b"", headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"{method} https://{self.host}:{self.port}{path} failed: {e}; "
                                 "is the server running, its certificate trusted (--ca), and, "
                                 "if it requires one, your client certificate given (--cert, "
                                 "--key)?") from e
        finally:
            conn.close()
        if resp.status != 200:
            raise _refusal(resp.status, data, resp.getheader("Retry-After"))
        return data

    def info(self) -> dict:
        return json.loads(self._request("GET", "/v1/model"))

    def open_session(self, keys: EvaluationKeys) -> str:
        return json.loads(self._request("POST", "/v1/sessions", keys.dumps()))["session"]

    def score(self, session: str, batch: Batch) -> Batch:
        return Batch.loads(self._request("POST", f"/v1/sessions/{session}/score", batch.dumps()))

    def close_session(self, session: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session}")


def _preprocessing(info: dict, given: Preprocessor | str | Path | None) -> Preprocessor:
    """The preprocessing to apply: the one given (checked against the server's feature list),
    else the one the server publishes."""
    if given is None:
        if info.get("preprocessing") is None:
            raise ConfigError("the server does not publish its preprocessing statistics; ask "
                              "the model owner for the preprocessing file (hefl infer "
                              "export-preprocessing) and pass it with --preprocessing FILE")
        return Preprocessor.from_dict(info["preprocessing"])
    pre = given if isinstance(given, Preprocessor) else Preprocessor.load(given)
    if info.get("features") is not None and list(pre.feature_names) != info["features"]:
        raise ConfigError(f"the preprocessing makes features {list(pre.feature_names)[:6]}..., "
                          f"the server's model takes {info['features'][:6]}...; use the "
                          "preprocessing file that came with this model")
    return pre


def _token(token: str | Token | None, token_file: str | Path | None) -> Token | None:
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token file {str(token_file)!r}: {e}; hefl certs "
                              "writes it as certs/clients/NAME.token") from e
    if token is None or isinstance(token, Token):
        return token
    try:
        return Token.parse(token)
    except TransportError as e:
        raise ConfigError(f"bad token{f' in {str(token_file)!r}' if token_file else ''}: "
                          f"{e}") from e


def _refusal(status: int, data: bytes, retry_after: str | None) -> HeflError:
    """The error a non-200 reply stands for (the server's own class where it names one)."""
    try:
        err = json.loads(data)
        name, code, msg = err.get("error", ""), err.get("code", ""), err.get("message", "")
    except (ValueError, AttributeError):
        name, code, msg = "", "", data[:200].decode(errors="replace")
    if status == 429:
        return QuotaExceeded(f"server: {msg}", retry_after_s=int(retry_after or 0))
    if name == "Refused" or status in (401, 403, 411, 413, 503):
        return Refused(code or f"HTTP_{status}", f"server: {msg}")
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, HeflError) and cls not in (Refused,
                                                                           QuotaExceeded):
        return cls(f"server: {msg}")
    return TransportError(f"server answered {status}: {msg}")


@dataclass(frozen=True)
class ScoreSummary:
    """What ``score_csv`` did."""

    rows: int
    scored: int
    skipped: int
    batches: int
    unknown_categories: dict[str, int]
    seconds: float
    accuracy: float | None = None


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
    sep: str | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    keyring: Keyring | None = None,
    progress: Callable[[int, int], None] | None = None,
    preprocessing: Preprocessor | str | Path | None = None,
    workers: int = 1,
) -> ScoreSummary:
    """Data owner: preprocess ``data``, encrypt, score, decrypt and append
    ``row,logit,probability`` to ``out`` after every batch (flushed), so an interruption loses
    nothing already scored; ``resume=True`` continues after the rows already in ``out``.

    Args:
        workers: processes that share the encryption (this one included; ``workers - 1``
            helpers are started once, for this call), when no ``keyring`` is given.
        sep: the CSV separator; default: the model's training file's (in the preprocessing),
            else sniffed.
        preprocessing: the model's preprocessing (a ``Preprocessor`` or the file from
            ``hefl infer export-preprocessing``), checked against the features the server
            lists; needed unless the server publishes it.

    Raises:
        ConfigError: no preprocessing, or one for other features than the server's model.
        DataError: bad CSV (missing columns, NaN, ...): raised before anything is sent.
        ContextMismatch / TransportError: from the server; rows scored so far stay in ``out``.
    """
    t0 = time.perf_counter()
    info = client.info()
    pre = _preprocessing(info, preprocessing)
    table = read_csv(data, sep=sep if sep is not None else pre.sep)
    x, unknown = pre.transform_report(table)
    out = Path(out)
    done = 0
    if out.exists():
        if not resume:
            raise DataError(f"{out} exists; pass --resume to continue it or choose another --out")
        done = _rows_done(out)
        if done > len(x):
            raise DataError(f"{out} already holds {done} scores but {data} has {len(x)} rows; "
                            "it belongs to another data file")
    own_keyring = keyring is None
    if keyring is None:  # the parameters are re-checked for 128-bit security here
        keyring = Keyring.generate(CkksParams.from_dict(info["ckks"]),
                                   relin=bool(info["needs_relin_keys"]), workers=workers)
    try:
        session = client.open_session(keyring.evaluation_keys())
    except BaseException:
        if own_keyring:
            keyring.close()
        raise
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
        if own_keyring:
            keyring.close()
    return ScoreSummary(len(x), len(x) - done, done, batches, unknown, time.perf_counter() - t0,
                        _accuracy(out, table, pre))


def _accuracy(out: Path, table: Table, pre: Preprocessor) -> float | None:
    """Accuracy of the decrypted scores in ``out`` (logit > 0 is class 1) when the scored CSV
    also holds the target column (a held-out split), else None."""
    if pre.target not in table.columns:
        return None
    labels = table[pre.target]
    with open(out, newline="") as f:
        logits = np.array([float(r["logit"]) for r in csv.DictReader(f)])
    if len(logits) != len(labels):
        return None
    # only rows labelled with one of the model's two classes count (new records leave it blank)
    other = {c for c in np.unique(labels) if c != pre.positive and c.strip()}
    if len(other) > 1:  # a third label: not this model's target
        return None
    known = (labels == pre.positive) | np.isin(labels, sorted(other))
    if not known.any():
        return None
    y = labels[known] == pre.positive
    return float(((logits[known] > 0) == y).mean())
