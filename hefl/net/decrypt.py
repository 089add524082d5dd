"""Verified, once-per-round decryption: what a key holder checks before it decrypts anything.

The server asks a key holder to decrypt with a DECODE task whose body is a ``DecodeRequest``:
the round's signed contributions, not a sum. The key holder (``VerifiedDecryptor.decode``):

    1. parses the request; run id and round must be the task's
    2. ledger: this (run, round) was decrypted before -> the same request gets the same stored
       answer (a restarted server or a lost reply), any other request is refused; a global model
       already used by another decrypted round is refused (replayed model)
    3. every contribution is signed by a distinct data client of *its own* copy of the registry
       (never the server's word), over this run, round, attempt, model digest and payload digest
    4. at least ``min_clients`` of them (its own policy; the server cannot lower it)
    5. recomputes the sum of their ciphertexts itself, decrypts it (``KeyHolder.decode``: weight
       and range checks, CKKS noise flooding), and writes the answer to the ledger, durably,
       *before* it answers: a kill -9 at any moment cannot yield two different decryptions

So a server that lies can obtain, at most once per round, the aggregate of at least
``min_clients`` contributions that distinct registered data clients made for that round's model.
It cannot pad a victim's ciphertext with its own encryptions of zero (they carry no signature),
forge a count (the count is the number of verified signatures), decode twice and difference, or
replay an old round (the signature names the round). Each refusal raises ``DecodeRefused`` with
the reason, which the key holder logs and sends back.

Threshold custody (``hefl.crypto.threshold``): a member answers ``partial`` instead of
``decode``, after the same checks, with its flooded partial decryption for the decrypting set the
server names. One request per round; the same request and set get the stored answer; the same
request for another set (a member down or lying) gets a new partial, which spends budget.

CKKS decryptions are flooded with fresh noise (``hefl.crypto.flooding``) so the answer does not
reveal the secret key; a repeated request gets the stored answer (the same noise, nothing to
average), and the key answers at most ``flood_queries`` ciphertext decryptions (counted from the
ledger across restarts).

Not prevented here: a server may broadcast a *slightly changed* model in a later round to a
subset differing by one client and difference the two aggregates; differential privacy bounds
that (docs/threat-model.md).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from hefl.errors import ConfigError, CryptoError, DecodeRefused, UpdateRejected
from hefl.net.identity import digest, statement, verify
from hefl.net.proto import hefl_pb2 as pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS decodes (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, request BLOB NOT NULL, model BLOB NOT NULL,
    signers TEXT NOT NULL, mean BLOB NOT NULL, weight REAL NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (run_id, round));
CREATE INDEX IF NOT EXISTS decodes_model ON decodes (model);
CREATE TABLE IF NOT EXISTS partials (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, members TEXT NOT NULL, request BLOB NOT NULL,
    model BLOB NOT NULL, signers TEXT NOT NULL, partial BLOB, at REAL NOT NULL,
    PRIMARY KEY (run_id, round, members));
CREATE INDEX IF NOT EXISTS partials_model ON partials (model);
"""

#: Threshold key holders keep the answers of this many most recent rounds (a partial decryption
#: is 64 KiB per ciphertext); an identical request for an older round is refused, never answered
#: with fresh noise.
KEEP_PARTIAL_ROUNDS = 2


@dataclass(frozen=True)
class Decoded:
    """One decryption as the ledger remembers it."""

    run_id: str
    round: int
    request: bytes  # SHA-256 of the DecodeRequest body
    model: bytes
    signers: tuple[str, ...]
    mean: np.ndarray
    weight: float


class DecodeLedger:
    """The key holder's durable memory of what it decrypted (SQLite, synchronous=FULL).

    Keep it with the key holder's secret (never on the server). Deleting it re-opens every
    round to a second decryption: don't.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.path.chmod(0o600)

    def get(self, run_id: str, round_num: int) -> Decoded | None:
        with self._lock:
            row = self.db.execute(
                "SELECT request, model, signers, mean, weight FROM decodes "
                "WHERE run_id = ? AND round = ?", (run_id, round_num)).fetchone()
        if row is None:
            return None
        return Decoded(run_id, round_num, row[0], row[1], tuple(row[2].split(",")),
                       np.frombuffer(row[3], "<f8").copy(), float(row[4]))

    def model_used(self, model: bytes) -> tuple[str, int] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT run_id, round FROM decodes WHERE model = ? UNION ALL "
                "SELECT run_id, round FROM partials WHERE model = ? LIMIT 1",
                (model, model)).fetchone()
        return (str(row[0]), int(row[1])) if row else None

    def round_request(self, run_id: str, round_num: int) -> bytes | None:
        """Threshold: the request a round's partial decryptions answered (one per round)."""
        with self._lock:
            row = self.db.execute("SELECT request FROM partials WHERE run_id = ? AND round = ? "
                                  "LIMIT 1", (run_id, round_num)).fetchone()
        return bytes(row[0]) if row else None

    def partial(self, run_id: str, round_num: int, members: str) -> tuple[bool, bytes | None]:
        """(answered before, the stored answer or None once pruned) for a decrypting set."""
        with self._lock:
            row = self.db.execute(
                "SELECT partial FROM partials WHERE run_id = ? AND round = ? AND members = ?",
                (run_id, round_num, members)).fetchone()
        if row is None:
            return False, None
        return True, None if row[0] is None else bytes(row[0])

    def record_partial(self, run_id: str, round_num: int, members: str, request: bytes,
                       model: bytes, signers: tuple[str, ...], partial: bytes) -> None:
        """Durably remember a partial decryption; forget the bytes of older rounds' answers."""
        try:
            with self._lock:
                self.db.execute(
                    "INSERT INTO partials VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, round_num, members, request, model, ",".join(signers), partial,
                     time.time()))
                self.db.execute(
                    "UPDATE partials SET partial = NULL WHERE run_id = ? AND round <= ?",
                    (run_id, round_num - KEEP_PARTIAL_ROUNDS))
        except sqlite3.IntegrityError as e:
            raise DecodeRefused(f"round {round_num} of run {run_id!r} was answered for set "
                                f"{members} meanwhile") from e

    def record(self, d: Decoded) -> None:
        """Durably remember ``d`` (raises ``DecodeRefused`` if the round was taken meanwhile)."""
        try:
            with self._lock:
                self.db.execute(
                    "INSERT INTO decodes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (d.run_id, d.round, d.request, d.model, ",".join(d.signers),
                     np.ascontiguousarray(d.mean, "<f8").tobytes(), d.weight, time.time()))
        except sqlite3.IntegrityError as e:
            raise DecodeRefused(f"round {d.round} of run {d.run_id!r} was decrypted "
                                "meanwhile; refusing a second decryption") from e

    def count(self) -> int:
        """Decryptions answered so far (whole rounds, and threshold partials)."""
        with self._lock:
            return int(self.db.execute(
                "SELECT (SELECT COUNT(*) FROM decodes) + (SELECT COUNT(*) FROM partials)"
            ).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self.db.close()


def parse_request(body: bytes) -> pb.DecodeRequest:
    try:
        return pb.DecodeRequest.FromString(body)
    except (DecodeError, ValueError) as e:
        raise DecodeRefused(f"malformed decode request: {e}") from e


class VerifiedDecryptor:
    """A key holder that decrypts only verified aggregates, at most once per (run, round).

    Args:
        holder: the ``hefl.crypto.KeyHolder`` (its secret share and its ``min_clients``), or a
            ``ThresholdKeyHolder`` (threshold custody: it answers ``partial``, not ``decode``).
        signers: registered data clients -> public identity key (hex), from the key holder's own
            copy of the registry (revoked clients and key holders left out).
        ledger: where decryptions are remembered across restarts.
    """

    def __init__(self, holder: Any, signers: Mapping[str, str], ledger: DecodeLedger) -> None:
        from hefl.crypto import SummingServer

        self.holder = holder
        self.signers = dict(signers)
        self.ledger = ledger
        self.summer = SummingServer(holder.share.public())
        self.threshold = holder.share.parties > 1
        # CKKS: the decryptions this key already answered count against its flooding budget
        spent = ledger.count() * holder.spec.n_ciphertexts
        holder.budget.used = max(holder.budget.used, spent)

    @property
    def min_clients(self) -> int:
        return int(self.holder.min_clients)

    def _parse(self, run_id: str, round_num: int, body: bytes) -> pb.DecodeRequest:
        req = parse_request(body)
        if req.run_id != run_id or req.round != round_num:
            raise DecodeRefused(
                f"the request names run {req.run_id!r} round {req.round}, the task run "
                f"{run_id!r} round {round_num}")
        return req

    def _fresh_model(self, req: pb.DecodeRequest) -> None:
        used = self.ledger.model_used(req.model_digest)
        if used is not None:
            raise DecodeRefused(
                f"the global model of this request was already used by round {used[1]} of run "
                f"{used[0]!r}: a replayed model is refused")

    def decode(self, run_id: str, round_num: int, body: bytes) -> tuple[np.ndarray, float]:
        """The mean update and total weight of a verified request; raises ``DecodeRefused``."""
        if self.threshold:
            raise DecodeRefused("this key holder holds a threshold share: it answers partial "
                                "decryptions for a decrypting set, never a whole decryption")
        req = self._parse(run_id, round_num, body)
        request = digest(body)
        prior = self.ledger.get(run_id, round_num)
        if prior is not None:
            if prior.request == request:
                return prior.mean, prior.weight  # the same request again: the same answer
            raise DecodeRefused(
                f"round {round_num} of run {run_id!r} was already decrypted (contributors "
                f"{', '.join(prior.signers)}); a second, different decryption of a round would "
                "reveal the difference of two sums")
        self._fresh_model(req)
        names = self._verified(req)
        mean, weight = self._decrypt(req)
        self.ledger.record(Decoded(run_id, round_num, request, bytes(req.model_digest),
                                   tuple(names), mean, weight))
        return mean, weight

    def _verified(self, req: pb.DecodeRequest) -> list[str]:
        names = [u.client for u in req.updates]
        if len(set(names)) != len(names):
            raise DecodeRefused(f"a client appears twice among the contributions {names}")
        if len(names) < self.min_clients:
            raise DecodeRefused(
                f"refusing to decrypt an aggregate of {len(names)} contribution(s): at least "
                f"min_clients={self.min_clients} distinct registered clients are required so no "
                "small group's update is revealed")
        attempts = {u.task_id for u in req.updates}
        if len(attempts) != 1:
            raise DecodeRefused(f"the contributions answer {len(attempts)} different attempts "
                                "of the round; one request must sum one attempt")
        if len(req.model_digest) != 32:
            raise DecodeRefused("the request carries no model digest")
        for u in req.updates:
            key = self.signers.get(u.client)
            if key is None:
                raise DecodeRefused(f"{u.client!r} is not a registered data client of this key "
                                    "holder's registry (or it is revoked)")
            message = statement(req.run_id, req.round, u.task_id, req.model_digest,
                                digest(u.payload))
            if not verify(key, message, u.signature):
                raise DecodeRefused(
                    f"the contribution of {u.client!r} does not carry its valid signature for "
                    f"round {req.round} of this model: forged, altered or replayed")
        return names

    def partial(self, run_id: str, round_num: int, body: bytes, members: Sequence[int]
                ) -> bytes:
        """Threshold: this member's partial decryption (``ThresholdPartial`` bytes) of a verified
        request for the decrypting set ``members``; raises ``DecodeRefused``.

        One round has one request: another request for a decrypted round is refused. The same
        request and set get the stored answer (the same noise); the same request for another set
        (a member was down or returned garbage) gets a new partial, which spends budget.
        """
        from hefl.crypto.threshold import check_members

        if not self.threshold:
            raise DecodeRefused("this key holder holds a whole key, not a threshold share")
        req = self._parse(run_id, round_num, body)
        try:
            ms = check_members(self.holder.spec, members)
        except CryptoError as e:
            raise DecodeRefused(str(e)) from e
        request, key = digest(body), ",".join(map(str, ms))
        prior = self.ledger.round_request(run_id, round_num)
        if prior is not None and prior != request:
            raise DecodeRefused(
                f"round {round_num} of run {run_id!r} was already decrypted from other "
                "contributions; a second, different decryption of a round would reveal the "
                "difference of two sums")
        answered, stored = self.ledger.partial(run_id, round_num, key)
        if answered:
            if stored is None:
                raise DecodeRefused(f"round {round_num} of run {run_id!r} was answered long "
                                    "ago and its answer is no longer kept; refusing to answer "
                                    "it again with fresh noise")
            return stored
        if prior is None:
            self._fresh_model(req)
        names = self._verified(req)
        try:
            part = self.holder.partial(self._sum(req), ms).to_bytes()
        except DecodeRefused:
            raise
        except (UpdateRejected, CryptoError) as e:
            raise DecodeRefused(str(e)) from e
        self.ledger.record_partial(run_id, round_num, key, request, bytes(req.model_digest),
                                   tuple(names), part)
        return bytes(part)

    def _sum(self, req: pb.DecodeRequest) -> Any:
        payloads = {u.client: bytes(u.payload) for u in req.updates}
        agg = self.summer.aggregate(payloads)
        if agg.rejected:
            why = "; ".join(f"{k}: {v}" for k, v in agg.rejected.items())
            raise DecodeRefused(f"signed contributions that cannot be summed: {why}")
        return agg.payload

    def _decrypt(self, req: pb.DecodeRequest) -> tuple[np.ndarray, float]:
        """Sum and decrypt the request's updates in one pass (``KeyHolder.decode_updates``)."""
        why = "signed contributions that cannot be summed"
        updates = {}
        for u in req.updates:
            try:
                updates[u.client] = self.summer.loads(bytes(u.payload))
                self.summer.validate(u.client, updates[u.client])
            except (UpdateRejected, CryptoError) as e:
                reason = e.reason if isinstance(e, UpdateRejected) else str(e)
                raise DecodeRefused(f"{why}: {u.client}: {reason}") from e
        try:
            return self.holder.decode_updates(updates)  # type: ignore[no-any-return]
        except UpdateRejected as e:  # SEAL refused one of its ciphertexts
            raise DecodeRefused(f"{why}: {e.client_id}: {e.reason}") from e
        except CryptoError as e:
            raise DecodeRefused(str(e)) from e


def registry_signers(entries: Any) -> dict[str, str]:
    """name -> sign_key of the registry's non-revoked data clients (``ClientEntry`` items).

    Raises:
        ConfigError: a data client has no ``sign_key`` (an old registry: run `hefl certs`).
    """
    out = {}
    for c in entries:
        if c.role != "client" or c.revoked:
            continue
        if not c.sign_key:
            raise ConfigError(f"registry entry {c.name!r} has no sign_key; regenerate the "
                              "registry with `hefl certs` (encrypted runs need identity keys)")
        out[c.name] = c.sign_key
    return out
