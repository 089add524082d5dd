"""Helper processes that share one batch's ciphertext work across CPU cores.

SEAL (through TenSEAL's bindings) holds the GIL, so threads do not help (measured: two threads
encrypt no faster than one). A ``HelperPool`` of ``workers`` is the calling process plus
``workers - 1`` *spawned* helper processes, started once (per keyring or evaluator session, not
per batch) and initialised once with the state they need. Work is split into ``workers`` chunks:
the helpers take all but the last, the caller computes the last itself, so on a 2-core machine
only one process is spawned and no core sits idle.

Start-up is not free (a spawned interpreter imports numpy and TenSEAL: about 0.3 s measured on
the 2-core box); ``started_s`` reports it so callers can count it. The pool refuses to start
inside a process that spawn is still bootstrapping (a script without an
``if __name__ == "__main__":`` guard, re-imported in a helper) and runs serially there instead of
recursing. Helpers are terminated by ``close()``, or when the pool is garbage-collected or the
interpreter exits.
"""

from __future__ import annotations

import multiprocessing
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from hefl.errors import ConfigError


def _ping() -> bool:
    return True


def _serve(conn: Any, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    """A helper's loop: run each ``(fn, args)`` received, send back ``(ok, result)``."""
    initializer(*initargs)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args = task
        try:
            reply = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - re-raised in the caller
            reply = (False, e)
        conn.send(reply)


def _bootstrapping() -> bool:
    """True inside a spawned child that is still importing its parent's main module."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _stop(procs: list[Any], conns: list[Any]) -> None:
    for c in conns:
        try:
            c.send(None)
            c.close()
        except OSError:
            pass
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.terminate()


class HelperPool:
    """The calling process plus ``workers - 1`` spawned helpers.

    Tasks go over one pipe per helper, sent and received by the calling thread itself: a
    ``multiprocessing.Pool`` dispatches from background threads, which wait for the GIL while
    this thread is inside SEAL, and was measured slower than serial.

    Args:
        workers: processes sharing the work, the caller included (1: serial, nothing spawned).
        initializer: run once in each helper with ``initargs`` (e.g. to load keys).
        initargs: arguments for ``initializer``; they reach the helpers over a local pipe.
    """

    def __init__(self, workers: int, initializer: Callable[..., None],
                 initargs: tuple[Any, ...] = ()) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.started_s = 0.0
        self._conns: list[Any] = []
        self.workers = 1
        if workers > 1 and not _bootstrapping():
            t0 = time.perf_counter()
            ctx = multiprocessing.get_context("spawn")
            procs = []
            for _ in range(workers - 1):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=_serve, args=(theirs, initializer, initargs),
                                daemon=True)
                p.start()
                theirs.close()
                procs.append(p)
                self._conns.append(mine)
            self.workers = workers
            self._finalizer = weakref.finalize(self, _stop, procs, list(self._conns))
            # Wait until every helper has imported and initialised, so start-up is counted here.
            self.run(_ping, _ping, [()] * workers)
            self.started_s = time.perf_counter() - t0

    @property
    def parallel(self) -> bool:
        """Whether helpers are running (False when serial, or after ``close``)."""
        return bool(self._conns)

    def run(self, remote: Callable[..., Any], local: Callable[..., Any],
            chunks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``remote(*chunk)`` in the helpers for all chunks but the last, ``local(*last)`` here,
        concurrently; results in chunk order. A helper's exception is re-raised here.

        Raises:
            ConfigError: more chunks than processes.
        """
        if not self._conns:
            return [local(*c) for c in chunks]
        if len(chunks) > self.workers:
            raise ConfigError(f"{len(chunks)} chunks for {self.workers} processes")
        *theirs, last = chunks
        for conn, c in zip(self._conns, theirs, strict=False):
            conn.send((remote, c))
        mine = local(*last)
        out = []
        for conn, _ in zip(self._conns, theirs, strict=False):
            ok, value = conn.recv()
            if not ok:
                raise value
            out.append(value)
        return [*out, mine]

    def close(self) -> None:
        """Stop the helpers (idempotent); the pool then runs serially."""
        if self._conns:
            self._finalizer()
            self._conns = []
            self.workers = 1


class UsesHelpers:
    """Mixin for a class whose ``_pool`` is a ``HelperPool``: start-up time, ``close`` and use as
    a context manager (which closes the helpers on exit)."""

    _pool: HelperPool

    @property
    def startup_s(self) -> float:
        """Seconds spent starting helper processes (0 when serial)."""
        return self._pool.started_s

    def close(self) -> None:
        """Stop the helper processes, if any (the object keeps working, serially)."""
        self._pool.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
