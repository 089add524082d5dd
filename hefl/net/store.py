"""Durable server state in SQLite: runs, rounds, metrics, the client registry, checkpoints.

One file, ``STATE_DIR/hefl.db``, in WAL mode with ``synchronous=FULL``. A round is committed in
one transaction (its record, its metrics and the new global model with the optimizer state), so
after a crash at any point the store holds either the whole round or none of it: a restart
resumes at the last completed round and never loses or repeats one. Reopening a run with other
``rounds`` extends or shortens it (``OpenedRun``); one server at a time holds the directory
(``StateLock``).

Example:
    >>> import tempfile, numpy as np
    >>> from hefl.rounds import RoundRecord
    >>> with tempfile.TemporaryDirectory() as d:
    ...     s = Store(d)
    ...     _ = s.open_run("r1", {"rounds": 2}, rounds=2, initial=np.zeros(3), opt_state=b"")
    ...     s.commit_round("r1", RoundRecord(1, 3, 3, 9.0, 0.5), np.ones(3), b"")
    ...     s.resume_point("r1")[0]
    ...     s.close()
    1
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from hefl.errors import ConfigError, RoundError, StateInUse
from hefl.rounds import RoundRecord

T = TypeVar("T")

DB_NAME = "hefl.db"
LOCK_NAME = "lock"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, config TEXT NOT NULL, rounds INTEGER NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, record TEXT NOT NULL, completed REAL NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, round, name)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, params BLOB NOT NULL, opt_state BLOB NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS clients (
    run_id TEXT NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL, revoked INTEGER NOT NULL,
    last_seen REAL, last_event TEXT, PRIMARY KEY (run_id, name)
);
"""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    config: dict[str, Any]
    rounds: int
    status: str
    created: float
    updated: float


@dataclass(frozen=True)
class OpenedRun:
    """What ``Store.open_run`` found and did. Truthy exactly when the run already existed, so
    ``existed = store.open_run(...)`` used as a bool keeps its old meaning.

    Attributes:
        run_id: the run.
        outcome: ``"created"`` (a new run, round 0 stored), ``"resumed"`` (it existed with the
            same rounds), ``"extended"`` (it existed with fewer rounds; now more) or
            ``"shortened"`` (it existed with more rounds; now fewer, never below ``completed``).
        rounds: the run's rounds as now stored (the ``rounds`` passed in).
        previous_rounds: the rounds stored before this call; None when created.
        completed: rounds already completed (0 when created); the run continues after it.
        reopened: it had finished and was set back to ``running`` because it was extended.
    """

    run_id: str
    outcome: Literal["created", "resumed", "extended", "shortened"]
    rounds: int
    previous_rounds: int | None = None
    completed: int = 0
    reopened: bool = False

    def __bool__(self) -> bool:
        return self.outcome != "created"

    @property
    def existed(self) -> bool:
        return self.outcome != "created"

    @property
    def message(self) -> str:
        """One line for the log, e.g. "run r extended from 2 to 3 rounds; continues after
        round 2 (it had finished)"."""
        r, n, done = self.run_id, self.rounds, self.completed
        if self.outcome == "created":
            return f"run {r} created with {n} rounds"
        if self.outcome == "resumed":
            return f"run {r} resumed after round {done} of {n}"
        where = (f"continues after round {done}" if done < n
                 else f"all {n} are already completed")
        return (f"run {r} {self.outcome} from {self.previous_rounds} to {n} rounds; {where}"
                + (" (it had finished)" if self.reopened else ""))


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    """Run a Store method under its connection lock (reads share the connection with writes)."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Store:
    """The server's state directory.

    Args:
        state_dir: folder holding ``hefl.db`` (created if missing).
        keep_checkpoints: how many recent global-model checkpoints to keep per run (>= 1).
        readonly: open for reading only (``hefl status`` while a server runs).
    """

    def __init__(self, state_dir: str | Path, keep_checkpoints: int = 3, readonly: bool = False):
        self.dir = Path(state_dir)
        self.path = self.dir / DB_NAME
        self.keep = max(1, keep_checkpoints)
        self._lock = threading.RLock()  # one connection shared by the server's threads
        if readonly:
            if not self.path.exists():
                raise ConfigError(f"no hefl state at {str(self.dir)!r} (missing {DB_NAME})")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            return
        from hefl.net.files import private_file

        private_file(self.path)  # SQLite gives its -wal and -shm files the database's mode
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self._lock, self.db:
            self.db.executescript(_SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def close(self) -> None:
        # Under the lock: a gRPC thread may be recording a client event as the server stops;
        # closing a connection another thread is using can crash the process.
        with self._lock:
            self.db.close()

    # ------------------------------------------------------------ runs

    def open_run(
        self,
        run_id: str,
        config: Mapping[str, Any],
        *,
        rounds: int,
        initial: np.ndarray,
        opt_state: bytes,
    ) -> OpenedRun:
        """Create the run with its round-0 checkpoint, or find it and adopt ``rounds``.

        A run is identified by what decides its result (``RunConfig.run_id``), not by where it
        stops, so a changed ``rounds`` extends or shortens the stored run instead of starting
        another: the runs row (and the stored config's top-level ``"rounds"``, if it has one)
        takes the new value, and a finished run that now has rounds left is set back to
        ``running``. ``config``, ``initial`` and ``opt_state`` are only stored when creating.

        Returns:
            ``OpenedRun``; truthy exactly when the run existed.

        Raises:
            ConfigError: ``rounds`` is below the rounds already completed (history is never
                deleted).
        """
        with self._lock, self.db:
            row = self.db.execute(
                "SELECT config, rounds, status FROM runs WHERE run_id=?", (run_id,)
            ).fetchone()
            now = time.time()
            if row is None:
                self.db.execute(
                    "INSERT INTO runs VALUES (?, ?, ?, 'running', ?, ?)",
                    (run_id, json.dumps(config, sort_keys=True), rounds, now, now),
                )
                self.db.execute(
                    "INSERT INTO checkpoints VALUES (?, 0, ?, ?)",
                    (run_id, _vec(initial), opt_state),
                )
                return OpenedRun(run_id, "created", rounds)
            stored, before, status = json.loads(row[0]), int(row[1]), str(row[2])
            done = int(self.db.execute(
                "SELECT COALESCE(MAX(round), 0) FROM rounds WHERE run_id=?", (run_id,)
            ).fetchone()[0])
            if rounds == before:
                return OpenedRun(run_id, "resumed", rounds, before, done)
            if rounds < done:
                raise ConfigError(
                    f"run {run_id!r} has already completed {done} rounds, more than rounds = "
                    f"{rounds}; completed rounds are never deleted. Set rounds to {done} or "
                    "more to keep this run, or change [run] name (or state_dir) for a new run"
                )
            reopen = status == "finished" and rounds > done
            if isinstance(stored, dict) and "rounds" in stored:
                stored["rounds"] = rounds
            self.db.execute(
                "UPDATE runs SET rounds=?, config=?, status=?, updated=? WHERE run_id=?",
                (rounds, json.dumps(stored, sort_keys=True), "running" if reopen else status,
                 now, run_id),
            )
        outcome: Literal["extended", "shortened"] = "extended" if rounds > before else "shortened"
        return OpenedRun(run_id, outcome, rounds, before, done, reopen)

    def set_status(self, run_id: str, status: str) -> None:
        with self._lock, self.db:
            self.db.execute(
                "UPDATE runs SET status=?, updated=? WHERE run_id=?", (status, time.time(), run_id)
            )

    @_locked
    def runs(self) -> list[RunInfo]:
        rows = self.db.execute(
            "SELECT run_id, config, rounds, status, created, updated FROM runs "
            "ORDER BY created DESC"
        ).fetchall()
        return [RunInfo(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    # ------------------------------------------------------------ rounds

    @_locked
    def resume_point(self, run_id: str) -> tuple[int, np.ndarray, bytes]:
        """(last completed round, its global params, its optimizer state); round 0 = initial."""
        with self._lock:
            row = self._last_checkpoint(run_id)
        if row is None:
            raise RoundError(f"run {run_id!r} has no checkpoint; it was never opened")
        return int(row[0]), np.frombuffer(row[1], "<f8").astype(np.float64), bytes(row[2])

    @_locked
    def _last_checkpoint(self, run_id: str) -> Any:
        return self.db.execute(
            "SELECT round, params, opt_state FROM checkpoints WHERE run_id=? "
            "ORDER BY round DESC LIMIT 1",
            (run_id,),
        ).fetchone()

    def commit_round(
        self, run_id: str, record: RoundRecord, params: np.ndarray, opt_state: bytes
    ) -> None:
        """Record a completed round and its checkpoint atomically.

        Raises:
            RoundError: the round was already committed or does not follow the last one.
        """
        last, _, _ = self.resume_point(run_id)
        if record.round != last + 1:
            raise RoundError(
                f"round {record.round} does not follow the last completed round {last}"
            )
        try:
            with self._lock, self.db:
                self.db.execute(
                    "INSERT INTO rounds VALUES (?, ?, ?, ?)",
                    (run_id, record.round, json.dumps(record.to_dict()), time.time()),
                )
                self.db.executemany(
                    "INSERT INTO metrics VALUES (?, ?, ?, ?)",
                    [(run_id, record.round, k, v) for k, v in _metric_rows(record)],
                )
                self.db.execute(
                    "INSERT INTO checkpoints VALUES (?, ?, ?, ?)",
                    (run_id, record.round, _vec(params), opt_state),
                )
                self.db.execute(
                    "DELETE FROM checkpoints WHERE run_id=? AND round<=?",
                    (run_id, record.round - self.keep),
                )
                self.db.execute("UPDATE runs SET updated=? WHERE run_id=?", (time.time(), run_id))
        except sqlite3.IntegrityError as e:
            raise RoundError(f"round {record.round} of run {run_id!r} is already recorded") from e

    @_locked
    def records(self, run_id: str) -> list[RoundRecord]:
        rows = self.db.execute(
            "SELECT record FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
        ).fetchall()
        return [RoundRecord(**json.loads(r[0])) for r in rows]

    @_locked
    def completed_rounds(self, run_id: str) -> list[int]:
        rows = self.db.execute(
            "SELECT round FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    # ------------------------------------------------------------ clients

    def register_clients(self, run_id: str, clients: Iterable[tuple[str, bool]]) -> None:
        """Upsert the registry (name, revoked) in index order."""
        with self._lock, self.db:
            for i, (name, revoked) in enumerate(clients):
                self.db.execute(
                    "INSERT INTO clients (run_id, name, idx, revoked) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(run_id, name) DO UPDATE SET idx=excluded.idx, "
                    "revoked=excluded.revoked",
                    (run_id, name, i, int(revoked)),
                )

    def client_event(self, run_id: str, name: str, event: str) -> None:
        with self._lock, self.db:
            self.db.execute(
                "UPDATE clients SET last_seen=?, last_event=? WHERE run_id=? AND name=?",
                (time.time(), event, run_id, name),
            )

    @_locked
    def clients(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT name, idx, revoked, last_seen, last_event FROM clients WHERE run_id=? "
            "ORDER BY idx",
            (run_id,),
        ).fetchall()
        return [
            {"name": r[0], "index": r[1], "revoked": bool(r[2]), "last_seen": r[3],
             "last_event": r[4]}
            for r in rows
        ]


class StateLock:
    """An exclusive lock on a state directory, so that one server at a time uses it.

    ``flock(LOCK_EX | LOCK_NB)`` on ``STATE_DIR/lock`` (created mode 0600), which then records
    the holder's address, pid and host as one JSON line. A second acquirer, in another process or
    in this one (flock locks belong to an open file description, so a second ``open`` conflicts),
    fails at once with ``StateInUse`` naming the holder. The kernel releases the lock when the
    holder closes it or its process exits for any reason, ``kill -9`` included, so a stale file
    never blocks a restart: the lock is the flock, not the file, and the file is never deleted
    (deleting it would let two processes lock two different files). Keep a reference: the lock
    is held until ``release()`` (or ``close()``, or the end of a ``with`` block) or the process
    exits, not dropped when the object is garbage-collected. The descriptor is not
    inherited across ``exec``; a ``fork``-ed child without exec shares the lock. flock is
    per-host: on a network file system shared by two hosts it may not exclude.

    Args:
        state_dir: the state directory (created if missing).
        address: what to record as the holder, e.g. ``"127.0.0.1:50051"``.

    Raises:
        StateInUse: another holder has the lock.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with StateLock(d, "127.0.0.1:5000"):
        ...         StateLock(d, "127.0.0.1:5001")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hefl.errors.StateInUse: state dir ... is in use by the server at 127.0.0.1:5000 ...
    """

    def __init__(self, state_dir: str | Path, address: str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / LOCK_NAME
        self.address = address
        self._fd: int | None = None
        self._guard = threading.Lock()
        self.acquire()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op if this object holds it); raises ``StateInUse`` if taken."""
        with self._guard:
            if self._fd is not None:
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(self.path, flags, 0o600)
            except OSError as e:
                raise ConfigError(
                    f"cannot open the lock file {str(self.path)!r}: {e}; check the state_dir "
                    "exists and is writable by this user"
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise _in_use(self.dir, holder) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            with contextlib.suppress(OSError):  # a file another user made: keep its mode
                os.fchmod(fd, 0o600)
            self._record()

    def set_address(self, address: str) -> None:
        """Record another address, e.g. the bound port once known after binding ``HOST:0``."""
        with self._guard:
            self.address = address
            if self._fd is not None:
                self._record()

    def release(self) -> None:
        """Give the lock up (idempotent). The file stays, emptied; the next holder rewrites it."""
        with self._guard:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    close = release

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _record(self) -> None:
        assert self._fd is not None
        line = json.dumps({"address": self.address, "pid": os.getpid(),
                           "host": socket.gethostname(), "since": time.time()}) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, line.encode(), 0)
        os.fsync(self._fd)


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder's record; it may be writing it just now, so wait a moment for a whole line."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        if raw.endswith(b"\n"):
            with contextlib.suppress(ValueError):
                rec = json.loads(raw)
                if isinstance(rec, dict):
                    return rec
        time.sleep(0.01)
    return {}


def _in_use(state_dir: Path, holder: Mapping[str, Any]) -> StateInUse:
    address = holder.get("address")
    pid = holder.get("pid")
    pid = pid if isinstance(pid, int) else None
    who = f"the server at {address}" if address else "another process (it recorded no address)"
    where = [f"pid {pid}"] if pid is not None else []
    if holder.get("host") and holder.get("host") != socket.gethostname():
        where.append(f"on host {holder['host']}")
    if where:
        who += f" ({' '.join(where)})"
    return StateInUse(
        f"state dir {str(state_dir)!r} is in use by {who}; stop it or use another state_dir",
        state_dir=str(state_dir), address=str(address) if address else None, pid=pid,
    )


def _vec(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f8").tobytes()


def _metric_rows(record: RoundRecord) -> list[tuple[str, float | None]]:
    rows: list[tuple[str, float | None]] = [
        ("contributors", float(record.contributors)),
        ("total_weight", float(record.total_weight)),
        ("upload_bytes", float(record.upload_bytes)),
        ("wall_s", float(record.wall_s)),
    ]
    if record.train_loss is not None:
        rows.append(("train_loss", float(record.train_loss)))
    rows += [(k, float(v)) for k, v in record.metrics.items()]
    return rows


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write a file so readers see the old or the new content, never a torn one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p
