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

import collections
import contextlib
import mmap
import multiprocessing
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

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


#: Pipe buffer that lets ``map`` keep two runs in flight per helper (``F_SETPIPE_SZ``).
WIDE_PIPE = 1 << 20


def _widen(fd: int) -> bool:
    """Give a pipe a 1 MiB buffer instead of 64 KiB, so a helper can write a chunk's results
    and go on while the caller is still busy with its own chunk (measured: with 64 KiB, two
    processes encrypted no faster than one). False where the system refuses (an unprivileged
    user past ``pipe-user-pages-soft``, or not Linux): ``map`` then keeps one run in flight."""
    import fcntl

    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return False
    try:
        return int(fcntl.fcntl(fd, set_size, WIDE_PIPE)) >= WIDE_PIPE
    except OSError:
        return False


class HelperExited(ConfigError):
    """A helper process is gone (killed, out of memory): this pool cannot finish its work."""


def _exited() -> HelperExited:
    return HelperExited("a helper process exited (see its error output above); close this pool "
                       "and run with workers=1")


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
        share: file descriptors the helpers inherit under the same numbers (a ``SharedSlots``
            memfd: arrays handed over without pipes).
    """

    def __init__(self, workers: int, initializer: Callable[..., None],
                 initargs: tuple[Any, ...] = (), share: Sequence[int] = ()) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.started_s = 0.0
        self._conns: list[tuple[Connection, Connection]] = []  # (to helper, from helper)
        self._waiting = False
        self.workers = 1
        self._depth = 1
        if workers > 1 and not _bootstrapping():
            self._t0 = time.perf_counter()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            procs = []
            wide = True
            for _ in range(workers - 1):
                r_in, w_in = os.pipe()  # caller -> helper
                r_out, w_out = os.pipe()  # helper -> caller
                widened = (_widen(w_in), _widen(w_out))
                wide = wide and all(widened)
                code = f"from hefl.crypto.workers import _child_main; _child_main({r_in}, {w_out})"
                procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                              pass_fds=(r_in, w_out, *share)))
                os.close(r_in)
                os.close(w_out)
                to_helper = Connection(w_in, readable=False)
                to_helper.send((initializer, initargs))
                self._conns.append((to_helper, Connection(r_out, writable=False)))
            self.workers = workers
            self._depth = 2 if wide else 1  # runs in flight per helper (``map``)
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
        except (EOFError, OSError):
            return False, _exited()

    def map(self, remote: Callable[..., Any], local: Callable[..., Any],
            chunks: Sequence[tuple[Any, ...]], most: int | None = None) -> list[Any]:
        """Every chunk once, as ``remote(*chunk)`` in a helper or ``local(*chunk)`` here;
        results in chunk order.

        Guided scheduling: a helper is handed a run of the remaining chunks (a share that
        shrinks as the work runs out, at most ``most`` chunks) in one message, and the next run
        before it has finished the first (two in flight where the pipes could be widened to
        1 MiB, else one, since a helper writing results and this process sending the next run
        into two full pipes would wait for each other), so it never waits for this process;
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
                    while len(pending[h]) < self._depth and nxt < len(chunks):
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
        sent: list[bool] = []
        for to_helper, _ in self._conns:
            try:
                to_helper.send((remote, args))
                sent.append(True)
            except OSError:  # the helper exited
                sent.append(False)
        replies = [self._reply(c) if ok else (False, _exited())
                   for ok, (_, c) in zip(sent, self._conns, strict=True)]
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


class SharedSlots:
    """Array slots in shared memory, through which this process hands helpers the data of a
    task without pickling it through a pipe.

    The memory is an anonymous memfd (``memfd_create``): it has no name and no path, and only
    the helpers started with ``HelperPool(..., share=(slots.fd,))`` inherit it. This process
    ``take``s a free slot, writes ``view[slot]`` and sends the slot's number in a task of a few
    bytes; ``give`` returns the slot once the helper has replied. A helper maps the same memory
    with ``SharedSlots.attach``. (Measured on 2 cores: handing over 512 rows of 2,048 uint64 as
    a pickle took 15-160 ms per task, the helper idle meanwhile, about a third of its time.)
    """

    def __init__(self, fd: int, slots: int, shape: tuple[int, ...], dtype: Any) -> None:
        self.fd, self.shape, self.dtype = fd, (slots, *shape), np.dtype(dtype)
        self._map = mmap.mmap(fd, self.nbytes(self.shape, self.dtype))
        self.view = np.frombuffer(self._map, self.dtype).reshape(self.shape)
        self._free = list(range(slots - 1, -1, -1))
        self._closer = weakref.finalize(self, _close_fd, fd)  # also when never closed

    @property
    def count(self) -> int:
        return self.shape[0]

    @staticmethod
    def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
        return int(np.prod(shape)) * np.dtype(dtype).itemsize

    @classmethod
    def create(cls, slots: int, shape: tuple[int, ...], dtype: Any) -> SharedSlots | None:
        """``slots`` arrays of ``shape`` and ``dtype``; None where memfds are missing (the
        caller then sends the data itself)."""
        create = getattr(os, "memfd_create", None)
        if create is None or slots < 1:
            return None
        try:
            fd = create("hefl-slots", os.MFD_CLOEXEC)
        except OSError:
            return None
        try:
            os.ftruncate(fd, cls.nbytes((slots, *shape), dtype))
            return cls(fd, slots, shape, dtype)
        except (OSError, ValueError):
            os.close(fd)
            return None

    @staticmethod
    def attach(fd: int, slots: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """In a helper: the slots (all of them, ``(slots, *shape)``) mapped from the inherited
        ``fd``."""
        full = (slots, *shape)
        mem = mmap.mmap(fd, SharedSlots.nbytes(full, dtype))
        os.close(fd)  # the mapping stays (with mmap's own duplicate of the descriptor)
        return np.frombuffer(mem, np.dtype(dtype)).reshape(full)

    def take(self) -> int | None:
        """A free slot's number, or None when every slot is in use."""
        return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def close(self) -> None:
        """Release the memory (what the helpers mapped stays theirs until they exit)."""
        self.view = np.empty((0,), self.dtype)
        with contextlib.suppress(BufferError, ValueError):  # a caller's view still alive: GC
            self._map.close()
        self._closer()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class HelperFeed:
    """Tasks sent to the helper the caller chooses, as the caller makes them, with no thread.

    Each helper runs its tasks in the order sent. Replies are read only when the caller asks:
    ``collect`` (those ready, or wait for one), ``send`` when that helper already has ``depth``
    tasks in flight, and ``wait`` for all. So the caller's own work (training, packing) never
    competes with a dispatching thread for the GIL, and a helper keeps working through the tasks
    in its pipe while the caller is busy. Give ``depth`` > 1 only for tasks of a few bytes (slot
    numbers of ``SharedSlots``), so that this process is never blocked writing into a full pipe.

    ``done(*task)``, if given, is called once for every task sent: run, failed, or lost with a
    helper that exited (e.g. to give back its slot). The helpers' errors are raised by ``wait``.
    """

    def __init__(self, pool: HelperPool, remote: Callable[..., Any], *, depth: int,
                 done: Callable[..., None] | None = None) -> None:
        pool.ready()  # the helpers' start-up replies must not be taken for task replies
        self.pool, self.remote, self.depth, self.done = pool, remote, depth, done
        self._flight: list[collections.deque[tuple[Any, ...]]] = [
            collections.deque() for _ in pool._conns]
        self._dead: set[int] = set()
        self._errors: list[BaseException] = []

    @property
    def in_flight(self) -> int:
        return sum(len(f) for f in self._flight)

    def _finished(self, tasks: Sequence[tuple[Any, ...]]) -> None:
        if self.done is not None:
            for task in tasks:
                self.done(*task)

    def _lost(self, h: int) -> None:
        """Helper ``h`` exited: its tasks in flight are lost."""
        self._dead.add(h)
        lost = list(self._flight[h])
        self._flight[h].clear()
        self._finished(lost)

    def send(self, h: int, *task: Any) -> None:
        """Send ``remote(*task)`` to helper ``h`` (first reading replies while it has ``depth``
        tasks in flight). To a helper that exited, the task is reported done at once and the
        exit raised by ``wait``."""
        try:
            while h not in self._dead and len(self._flight[h]) >= self.depth:
                self.collect(block=True)
        except BaseException:  # interrupted: the task was never sent
            self._finished([task])
            raise
        if h in self._dead:
            self._finished([task])
            return
        flight = self._flight[h]
        flight.append(task)  # before sending: its reply must find it here
        try:
            self.pool._conns[h][0].send((self.remote, task))
        except OSError:
            self._lost(h)
            self._errors.append(_exited())
        except BaseException:  # not sent (unpicklable, interrupted)
            if flight and flight[-1] is task:
                flight.pop()
                self._finished([task])
            raise

    def collect(self, block: bool) -> bool:
        """Read the replies that are ready (``block``: wait for at least one); False when no
        task is in flight."""
        from multiprocessing.connection import wait

        busy = [h for h, f in enumerate(self._flight) if f]
        if not busy:
            return False
        conns = [self.pool._conns[h][1] for h in busy]
        # not blocking: each pipe's own poll (a selector per call costs more than a few polls)
        ready = wait(conns) if block else conns
        for h, conn in zip(busy, conns, strict=True):
            while conn in ready and self._flight[h] and conn.poll():
                ok, value = HelperPool._reply(conn)
                task = self._flight[h].popleft()
                self._finished([task])
                if not ok:
                    self._errors.append(value)
                    if isinstance(value, HelperExited):
                        self._lost(h)
        return True

    def wait(self) -> None:
        """Wait for every task in flight; raise the first error since the last ``wait``."""
        while self.collect(block=True):
            pass
        errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def discard(self) -> None:
        """Wait for every task in flight, dropping their errors."""
        with contextlib.suppress(Exception):
            self.wait()
        self._errors = []


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
