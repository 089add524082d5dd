"""Helper processes that share one batch's ciphertext work across CPU cores.

SEAL (through TenSEAL's bindings) holds the GIL, so threads do not help (measured: two threads
encrypt no faster than one). A ``HelperPool`` of ``workers`` is the calling process plus
``workers - 1`` helper processes, started once (per keyring or evaluator session, not per batch)
and initialised once with the state they need. Work comes in chunks, each handed to
whichever helper is free, or done by the caller itself while all helpers are busy, so on a
2-core machine only one process is started, no core sits idle, and a helper slowed by another
tenant's load simply takes fewer chunks.

Each helper is a fresh interpreter (``python -c``, the parent's ``sys.path``) that imports only
this package: unlike ``multiprocessing``'s spawn start method it does not re-import the caller's
main module, so a script needs no ``if __name__ == "__main__":`` guard and the helper does not
pay for the script's own imports (measured: a benchmark script importing PyTorch made each
spawned helper take 2 s to start; a fresh interpreter takes about 0.3 s). Start-up still costs
that much once, so ``ready()`` reports it in ``started_s`` and callers can count it. Inside a
process that ``multiprocessing`` is still bootstrapping, the pool runs serially.

Tasks and results travel as pickles over a private pipe pair between this process and its own
child, never over a network. One pipe per helper, sent and received by the calling thread
itself: ``multiprocessing.Pool`` dispatches from background threads, which wait for the GIL
while this thread is inside SEAL, and was measured slower than serial. Helpers exit when
``close()`` is called, when the pool is garbage-collected or the interpreter exits (their pipe
closes).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from hefl.errors import ConfigError


def _ping() -> bool:
    return True


def _run_many(fn: Callable[..., Any], chunks: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [fn(*c) for c in chunks]


def _child_main(read_fd: int, write_fd: int) -> None:
    """A helper's loop: initialise, then run each ``(fn, args)`` and send ``(ok, result)``."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        initializer, initargs = inbox.recv()
        initializer(*initargs)
    except EOFError:
        return
    while True:
        try:
            task = inbox.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, args = task
        try:
            reply = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - re-raised in the caller
            reply = (False, e)
        outbox.send(reply)


def _widen(fd: int) -> None:
    """Give a pipe the largest buffer an unprivileged process may (Linux: 1 MiB, not 64 KiB), so
    a helper can write a chunk's results and go on while the caller is still busy with its own
    chunk (measured: with 64 KiB, two processes encrypted no faster than one)."""
    import fcntl

    size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if size is None:
        return
    for want in (1 << 20, 1 << 18):
        try:
            fcntl.fcntl(fd, size, want)
            return
        except OSError:
            continue


def _bootstrapping() -> bool:
    """True inside a spawned child that is still importing its parent's main module."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _stop(procs: list[subprocess.Popen], conns: list[tuple[Connection, Connection]]) -> None:
    for out, inp in conns:
        for c in (out, inp):
            with contextlib.suppress(OSError):
                c.close()
    for p in procs:
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class HelperPool:
    """The calling process plus ``workers - 1`` helper processes.

    Args:
        workers: processes sharing the work, the caller included (1: serial, nothing started).
        initializer: a module-level function run once in each helper with ``initargs`` (e.g. to
            load keys); it reaches the helper by reference, its arguments by pipe.
        initargs: arguments for ``initializer``.
    """

    def __init__(self, workers: int, initializer: Callable[..., None],
                 initargs: tuple[Any, ...] = ()) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.started_s = 0.0
        self._conns: list[tuple[Connection, Connection]] = []  # (to helper, from helper)
        self._waiting = False
        self.workers = 1
        if workers > 1 and not _bootstrapping():
            self._t0 = time.perf_counter()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            procs = []
            for _ in range(workers - 1):
                r_in, w_in = os.pipe()  # caller -> helper
                r_out, w_out = os.pipe()  # helper -> caller
                _widen(w_in)
                _widen(w_out)
                code = f"from hefl.crypto.workers import _child_main; _child_main({r_in}, {w_out})"
                procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                              pass_fds=(r_in, w_out)))
                os.close(r_in)
                os.close(w_out)
                to_helper = Connection(w_in, readable=False)
                to_helper.send((initializer, initargs))
                self._conns.append((to_helper, Connection(r_out, writable=False)))
            self.workers = workers
            self._finalizer = weakref.finalize(self, _stop, procs, list(self._conns))
            for to_helper, _ in self._conns:  # answered once the helper is initialised
                to_helper.send((_ping, ()))
            self._waiting = True

    @property
    def parallel(self) -> bool:
        """Whether helpers are running (False when serial, or after ``close``)."""
        return bool(self._conns)

    def ready(self) -> float:
        """Wait until every helper has started and initialised; returns ``started_s``, the
        seconds from starting them to now (0 when serial; later calls return it unchanged)."""
        if self._waiting:
            self._waiting = False
            for _, from_helper in self._conns:
                self._reply(from_helper)
            self.started_s = time.perf_counter() - self._t0
        return self.started_s

    @staticmethod
    def _reply(conn: Connection) -> tuple[bool, Any]:
        try:
            return conn.recv()
        except EOFError:
            return False, ConfigError("a helper process exited (see its error output above); "
                                      "close this pool and run with workers=1")

    def map(self, remote: Callable[..., Any], local: Callable[..., Any],
            chunks: Sequence[tuple[Any, ...]], most: int | None = None) -> list[Any]:
        """Every chunk once, as ``remote(*chunk)`` in a helper or ``local(*chunk)`` here;
        results in chunk order.

        Guided scheduling: a helper is handed a run of the remaining chunks (a share that
        shrinks as the work runs out, at most ``most`` chunks) in one message, and the next run
        before it has finished the first (two in flight), so it never waits for this process;
        this process takes one chunk at a time and hands out runs in between, so no process
        waits long for another, and a helper slowed by another tenant's load simply takes fewer
        chunks. Give ``most`` so that two runs' results fit in a pipe's buffer (1 MiB): a helper
        whose results do not fit waits until this process reads them. Every reply is collected
        before an exception (the first, a helper's or ours) is re-raised, so the pipes stay in
        step.
        """
        if not self._conns:
            return [local(*c) for c in chunks]
        self.ready()
        results: list[Any] = [None] * len(chunks)
        pending: dict[int, list[int]] = {h: [] for h in range(len(self._conns))}  # run starts
        errors: list[BaseException] = []
        nxt = 0

        def collect(block: bool) -> None:
            for h, runs in pending.items():
                conn = self._conns[h][1]
                while runs and (block or conn.poll()):
                    ok, value = self._reply(conn)
                    start = runs.pop(0)
                    if ok:
                        results[start : start + len(value)] = value
                    else:
                        errors.append(value)

        try:
            while nxt < len(chunks) and not errors:
                collect(block=False)
                for h, (to_helper, _) in enumerate(self._conns):
                    while len(pending[h]) < 2 and nxt < len(chunks):
                        n = max(1, (len(chunks) - nxt) // (2 * self.workers))
                        n = min(n, most) if most else n
                        to_helper.send((_run_many, (remote, chunks[nxt : nxt + n])))
                        pending[h].append(nxt)
                        nxt += n
                if nxt < len(chunks):
                    results[nxt] = local(*chunks[nxt])
                    nxt += 1
        finally:
            collect(block=True)
        if errors:
            raise errors[0]
        return results

    def each(self, remote: Callable[..., Any], *args: Any) -> list[Any]:
        """``remote(*args)`` once in every helper; their results ([] when serial)."""
        self.ready()
        for to_helper, _ in self._conns:
            to_helper.send((remote, args))
        replies = [self._reply(from_helper) for _, from_helper in self._conns]
        for ok, value in replies:
            if not ok:
                raise value
        return [value for _, value in replies]

    def close(self) -> None:
        """Stop the helpers (idempotent); the pool then runs serially."""
        if self._conns:
            self._finalizer()
            self._conns = []
            self._waiting = False
            self.workers = 1


class TaskStream:
    """Tasks run as they are put, in a pool's helpers, while the caller does other work.

    A background thread hands each queued task to whichever helper is idle (one task per helper
    at a time, so the queue stays with this process); ``drain`` then has the caller run what is
    still queued itself and waits for the helpers' last tasks. Results are not returned: a task
    leaves its effect in the process that ran it (``remote`` in a helper, ``local`` here), to be
    collected with ``HelperPool.each``. The first error, a helper's or ours, is raised by
    ``drain``. The thread waits in ``multiprocessing.connection.wait`` and holds the GIL only to
    send a task or read a reply, so it costs the caller's work (training, packing) little.
    """

    def __init__(self, pool: HelperPool, remote: Callable[..., Any],
                 local: Callable[..., Any]) -> None:
        import collections
        import threading

        self.pool, self.remote, self.local = pool, remote, local
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._cv = threading.Condition()
        self._busy: set[int] = set()
        self._errors: list[BaseException] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        if pool.parallel:
            pool.ready()  # here: the helpers' start-up replies must not race the thread's reads
            self._thread = threading.Thread(target=self._dispatch, name="hefl-helpers",
                                            daemon=True)
            self._thread.start()

    def put(self, *task: Any) -> None:
        """Queue ``task`` (the arguments of one ``remote``/``local`` call)."""
        with self._cv:
            self._queue.append(task)
            self._cv.notify_all()

    def _dispatch(self) -> None:
        from multiprocessing.connection import wait

        conns = self.pool._conns
        while True:
            with self._cv:
                while not self._closed and not (self._queue and len(self._busy) < len(conns)) \
                        and not self._busy:
                    self._cv.wait()
                if self._closed and not self._busy:
                    return
                for h, (to_helper, _) in enumerate(conns):
                    if h not in self._busy and self._queue:
                        to_helper.send((self.remote, self._queue.popleft()))
                        self._busy.add(h)
                busy = list(self._busy)
            ready = wait([conns[h][1] for h in busy], timeout=0.05)
            for h in busy:
                if conns[h][1] in ready:
                    ok, value = self.pool._reply(conns[h][1])
                    with self._cv:
                        if not ok:
                            self._errors.append(value)
                        self._busy.discard(h)
                        self._cv.notify_all()

    def drain(self) -> None:
        """Run the queued tasks here until none is left, wait for the helpers' last ones, and
        raise the first error."""
        while True:
            with self._cv:
                if not self._queue or self._errors:
                    break
                task = self._queue.popleft()
            try:
                self.local(*task)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the helpers
                with self._cv:
                    self._errors.append(e)
        with self._cv:
            while self._busy:
                self._cv.wait()
            self._queue.clear()
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop the dispatching thread (after the helpers' running tasks)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class UsesHelpers:
    """Mixin for a class whose ``_pool`` is a ``HelperPool``: start-up time, ``close`` and use as
    a context manager (which closes the helpers on exit)."""

    _pool: HelperPool

    @property
    def startup_s(self) -> float:
        """Seconds the helper processes took to start (waits for them; 0 when serial)."""
        return self._pool.ready()

    def close(self) -> None:
        """Stop the helper processes, if any (the object keeps working, serially)."""
        self._pool.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
