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
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
        self._lock = threading.Lock()

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
        os.close(fd)  # the mapping stays
        return np.frombuffer(mem, np.dtype(dtype)).reshape(full)

    def take(self) -> int | None:
        """A free slot's number, or None when every slot is in use."""
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        """Release the memory (what the helpers mapped stays theirs until they exit)."""
        self.view = np.empty((0,), self.dtype)
        with contextlib.suppress(BufferError, ValueError):  # a caller's view still alive: GC
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class _Stream:
    """What a ``TaskStream``'s thread shares with it (never the stream or the pool itself, so
    that both can be collected, which stops the thread and the helpers)."""

    conns: list[tuple[Connection, Connection]]
    remote: Callable[..., Any]
    depth: int
    done: Callable[..., None] | None
    cv: threading.Condition = field(default_factory=threading.Condition)
    queue: collections.deque[tuple[Any, ...]] = field(default_factory=collections.deque)
    running: dict[int, collections.deque[tuple[Any, ...]]] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    closed: bool = False

    def busy(self) -> list[int]:
        """The helpers with tasks in flight."""
        return [h for h, run in self.running.items() if run]

    def finished(self, tasks: Sequence[tuple[Any, ...]]) -> None:
        """Tell ``done`` about tasks run, failed or dropped (outside the lock)."""
        if self.done is not None:
            for task in tasks:
                self.done(*task)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            dropped = list(self.queue)
            self.queue.clear()
            self.cv.notify_all()
        self.finished(dropped)


def _pump(st: _Stream) -> None:
    """Collect the helpers' replies that are ready and refill each live helper to ``depth``
    tasks in flight, without waiting; called by the stream's thread and by the caller between
    its own tasks (so helpers are fed even while the caller keeps the GIL busy)."""
    ended: list[tuple[Any, ...]] = []
    with st.cv:
        for h in st.busy():
            conn, run = st.conns[h][1], st.running[h]
            while run and conn.poll():
                ok, value = HelperPool._reply(conn)
                ended.append(run.popleft())
                if not ok:
                    st.errors.append(value)
                    if isinstance(value, HelperExited):  # its other tasks are lost
                        st.dead.add(h)
                        ended += run
                        run.clear()
        for h in range(len(st.conns)):
            run = st.running.setdefault(h, collections.deque())
            while h not in st.dead and len(run) < st.depth and st.queue:
                task = st.queue.popleft()
                try:
                    st.conns[h][0].send((st.remote, task))
                except OSError:
                    st.queue.appendleft(task)  # another process can still run it
                    st.dead.add(h)
                    st.errors.append(_exited())
                    break
                run.append(task)
        st.cv.notify_all()
    st.finished(ended)


def _dispatch(st: _Stream) -> None:
    """The thread of a ``TaskStream``: wait for replies and ``_pump``. A helper that cannot be
    reached is marked dead (its tasks are lost) and its error kept for ``drain``; nothing
    escapes this function, so the thread never leaves tasks in flight behind it."""
    from multiprocessing.connection import wait

    while True:
        try:
            with st.cv:
                while (not st.busy() and not st.closed
                       and not (st.queue and len(st.dead) < len(st.conns))):
                    st.cv.wait()
                if st.closed and not st.busy():
                    return
                busy = st.busy()
            if busy:
                wait([st.conns[h][1] for h in busy], timeout=0.05)
            _pump(st)
        except Exception as e:  # noqa: BLE001 - kept for drain; the thread must not die silently
            with st.cv:
                st.errors.append(e)
                st.dead.update(st.busy())
                lost = [t for run in st.running.values() for t in run]
                st.running.clear()
                st.closed = True
                st.cv.notify_all()
            st.finished(lost)
            return


class TaskStream:
    """Tasks run as they are put, in a pool's helpers, while the caller does other work.

    A background thread keeps ``depth`` queued tasks in flight in each helper (the next is
    already in its pipe when it finishes one; give ``depth`` > 1 only for tasks of a few bytes,
    e.g. slot numbers of ``SharedSlots``, so two full pipes never wait for each other), and the
    queue stays with this process; ``drain`` then has the caller run what is still queued itself
    and waits for the helpers' last tasks. Results are not returned: a task leaves its effect in
    the process that ran it (``remote`` in a helper, ``local`` here), to be collected with
    ``HelperPool.each``; ``done(*task)``, if given, is called once for every task put, whether
    it ran, failed or was dropped (e.g. to give back its slot). The first error, a helper's or
    ours, is raised by ``drain``; a helper that exits is reported there too (the others and this
    process finish the queue). The thread waits in ``multiprocessing.connection.wait`` and holds
    the GIL only to send a task or read a reply, so it costs the caller's work (training,
    packing) little.
    """

    def __init__(self, pool: HelperPool, remote: Callable[..., Any], local: Callable[..., Any],
                 *, depth: int = 1, done: Callable[..., None] | None = None) -> None:
        self.pool, self.local = pool, local
        self._st = _Stream(pool._conns, remote, depth, done)
        self._thread: threading.Thread | None = None
        if pool.parallel:
            pool.ready()  # here: the helpers' start-up replies must not race the thread's reads
            self._thread = threading.Thread(target=_dispatch, args=(self._st,),
                                            name="hefl-helpers", daemon=True)
            self._thread.start()
        weakref.finalize(self, self._st.close)

    def put(self, *task: Any) -> None:
        """Queue ``task`` (the arguments of one ``remote``/``local`` call); a helper with room
        gets it at once."""
        st = self._st
        with st.cv:
            st.queue.append(task)
            st.cv.notify_all()
        self.pump()

    def pump(self) -> None:
        """Collect the replies that are ready and hand queued tasks to helpers with room (never
        waits); call it between tasks of your own."""
        if self._thread is not None:
            _pump(self._st)

    def _settle(self) -> list[BaseException]:
        """Wait for the helpers' running tasks; the errors so far (cleared)."""
        st = self._st
        with st.cv:
            while st.busy():
                st.cv.wait()
            dropped = list(st.queue)
            st.queue.clear()
            errors, st.errors = st.errors, []
        st.finished(dropped)
        return errors

    def drain(self) -> None:
        """Run the queued tasks here until none is left, wait for the helpers' last ones, and
        raise the first error."""
        st = self._st
        while True:
            self.pump()
            with st.cv:
                if not st.queue:
                    break
                task = st.queue.popleft()
            try:
                self.local(*task)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the helpers
                with st.cv:
                    st.errors.append(e)
                break  # the rest is dropped by ``_settle``
            finally:
                st.finished([task])
        errors = self._settle()
        if errors:
            raise errors[0]

    def discard(self) -> None:
        """Drop the queued tasks and wait for the running ones (their errors are dropped)."""
        self._settle()

    def close(self) -> None:
        """Stop the dispatching thread (after the helpers' running tasks)."""
        self._st.close()
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
