"""Encrypted aggregation in simulation across CPU cores, as the clients finish training.

In a simulation every party lives in one process, so the clients' ciphertexts need not be
serialized for the server to add them: that is the in-memory transport of DESIGN.md. A
``PooledSum`` is ``workers`` helper processes (``hefl.crypto.workers``), each holding the
clients' encryption key and the running sums of its own range of the ciphertexts:

    client      PooledEncoder.encode(id, delta, weight)  clip, quantize, pack here (as
                EncryptingClient), then copy the packed rows into shared-memory slots
                (``SharedSlots``) and send each helper the slot numbers of its range; the
                helpers encrypt the rows in place while this process trains the next client,
                and add each ciphertext to their running sums at once (streaming summation;
                nothing is kept per client). With every slot in flight, this process waits.
                PooledEncoder.flush()   waits for the helpers' last tasks
    server      PooledSummer.aggregate(pending updates)  each helper serializes its range's
                sums (once per ciphertext per round, not per client; no merging): an
                ``EncryptedSum``, the very bytes a deployed server would send
    key holder  unchanged: ``KeyHolder.decode`` / ``Committee.decode`` of that sum

The results are those of the serial path: the packing (and so the stochastic rounding and any DP
noise) is done here, in the clients' order, from the same generators; BFV sums are then equal
exactly, CKKS sums to within the encryption noise. An update is encrypted under the same key
and parameters by the same SEAL calls; only where it is added differs. Upload bytes are what a
real upload would carry, estimated: the framing plus the ciphertext count times the size of
three serialized sample ciphertexts (SEAL's zstd sizes of a ciphertext vary by about 0.2 %);
``hefl simulate`` says so. Bytes, anything not made by this encoder (a test's attack payload, a real
``EncryptedUpdate``) go through ``SummingServer`` as in deployment and are added to the pool's
sum.

The helpers are the pool's own children: they receive the clients' key once, at start, over a
private pipe (as ``EncryptingClient(workers=...)``); ``close()`` stops them.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hefl.aggregation import Aggregate
from hefl.crypto.keys import KeyShare, PublicContext, key_from_bytes
from hefl.crypto.seal import save
from hefl.crypto.secure_sum import (
    MAGIC_UPDATE,
    EncryptedSum,
    EncryptingClient,
    SummingServer,
    check_room,
)
from hefl.crypto.workers import HelperFeed, HelperPool, SharedSlots, UsesHelpers
from hefl.errors import ConfigError, CryptoError, UpdateRejected

#: Ciphertexts per task: large enough that a task's dispatch is a small share of its time
#: (about 35 ms of SEAL encryption at N = 2048), small enough that the last client's rows
#: spread over every process.
TASK_ROWS = 128
#: Shared memory for rows in flight (``SharedSlots``): as many tasks as fit in this many bytes
#: (32 per helper at N = 2048 with 2 helpers), and at least 2 per helper.
SLOT_BUDGET = 64 << 20


@dataclass(frozen=True)
class PendingUpdate:
    """One client's update, queued for encryption in the pool (the in-memory transport's
    payload): its round, and the bytes its upload would carry."""

    client_id: Hashable
    batch: int
    nbytes: int


class _Sums:
    """What each process of the pool holds: an ``EncryptingClient`` (the encryptor) and this
    round's running sums."""

    def __init__(self, client: EncryptingClient) -> None:
        self.client = client
        self.batch = -1
        self.acc: dict[int, Any] = {}

    def encrypt_add(self, batch: int, start: int, rows: np.ndarray) -> None:
        """Encrypt ``rows`` (ciphertexts ``start, start + 1, ...`` of one client's update) and
        add each to the running sum, unserialized."""
        if batch != self.batch:
            self.batch, self.acc = batch, {}
        seal, acc = self.client.seal, self.acc
        for i, ct in enumerate(self.client.ciphertexts(rows), start):
            if i in acc:
                seal.add_inplace(acc[i], ct)
            else:
                acc[i] = ct

    def take(self, batch: int) -> dict[int, Any]:
        """This round's running sums; then reset."""
        out = self.acc if batch == self.batch else {}
        self.batch, self.acc = -1, {}
        return out

    def upload_bytes(self, n_ciphertexts: int) -> int:
        """What one client's upload of ``n_ciphertexts`` would carry on the wire (framing,
        then a length and the median size of three sample ciphertexts each)."""
        spec = self.client.spec
        row = np.zeros((1, spec.slot_values), np.uint64 if spec.scheme == "bfv" else np.float64)
        one = sorted(len(self.client.encrypt_rows(row)[0]) for _ in range(3))[1]
        return len(MAGIC_UPDATE) + 32 + 4 + n_ciphertexts * (4 + one)


_helper: _Sums | None = None
_slots: np.ndarray | None = None  # a helper's map of the pool's SharedSlots


def _init_helper(key_bytes: bytes, slots: tuple[Any, ...] | None = None) -> None:
    global _helper, _slots
    _helper = _Sums(EncryptingClient(key_from_bytes(key_bytes)))
    if slots is not None:
        _slots = SharedSlots.attach(*slots)


def _helper_encrypt_add(*task: Any) -> None:
    assert _helper is not None
    _helper.encrypt_add(*task)


def _helper_encrypt_slot(batch: int, start: int, slot: int, n: int) -> None:
    assert _helper is not None and _slots is not None
    _helper.encrypt_add(batch, start, _slots[slot, :n])


def _helper_take(batch: int) -> dict[int, bytes]:
    assert _helper is not None
    return {i: save(ct) for i, ct in _helper.take(batch).items()}


def _give_slot(slots: SharedSlots, batch: int, start: int, slot: int, n: int) -> None:
    slots.give(slot)


class PooledSum(UsesHelpers):
    """The pool shared by a ``PooledEncoder`` and a ``PooledSummer``: ``workers`` helper
    processes, each with the clients' key and the running sums of its own range of the
    ciphertexts; this process packs (and, in a simulation, trains) and hands the rows over.

    Every client's update covers every range, so the helpers share each update equally, and a
    round's sum needs no merging: each helper serializes its own range, once per round. The
    helpers take a core each (this process mostly waits for them, or trains while they work).
    Where no helper can be started, this process encrypts each update as it is put.
    """

    def __init__(self, client: EncryptingClient, key: PublicContext | KeyShare,
                 workers: int) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.spec = key.spec
        self._local = _Sums(client)  # serially (no helpers), and for the upload estimate
        n = self.spec.n_ciphertexts
        helpers = min(workers, n)  # each helper owns at least one ciphertext
        slots = self._slots = self._shared_slots(helpers)
        self._pool = HelperPool(  # the caller counts as one of a HelperPool's workers
            helpers + 1, _init_helper,
            (key.to_bytes(),) if slots is None else
            (key.to_bytes(), (slots.fd, slots.shape[0], slots.shape[1:], slots.dtype.str)),
            share=() if slots is None else (slots.fd,))
        self._feed: HelperFeed | None = None
        if not self._pool.parallel:
            if slots is not None:
                slots.close()
            self._slots = None
        elif self._slots is not None:  # rows by shared memory: tasks of a few bytes
            self._feed = HelperFeed(self._pool, _helper_encrypt_slot, depth=self._slots.count,
                                    done=functools.partial(_give_slot, self._slots))
        else:  # rows pickled through the pipes
            self._feed = HelperFeed(self._pool, _helper_encrypt_add, depth=2)
        h = max(1, self.workers)
        cut = [n * k // h for k in range(h + 1)]
        self._ranges = list(zip(cut[:-1], cut[1:], strict=True))  # helper k's ciphertexts
        self.batch = 0
        self.clients: list[Hashable] = []  # this round's queued updates, in order
        self._nbytes = self._local.upload_bytes(n)

    def _shared_slots(self, helpers: int) -> SharedSlots | None:
        rows = min(TASK_ROWS, self.spec.n_ciphertexts)
        shape = (rows, self.spec.slot_values)
        dtype = np.uint64 if self.spec.scheme == "bfv" else np.float64
        fit = SLOT_BUDGET // SharedSlots.nbytes(shape, dtype)
        return SharedSlots.create(max(2 * helpers, fit), shape, dtype)

    @property
    def workers(self) -> int:
        """The helper processes that encrypt (1 when this process does it alone)."""
        return max(1, len(self._pool._conns))

    def put(self, client_id: Hashable, rows: np.ndarray) -> PendingUpdate:
        """Hand one client's packed rows to the helpers (or encrypt them here, serially) for
        this round's sums."""
        if client_id in self.clients:
            raise UpdateRejected("this client already queued an update this round",
                                 client_id=client_id, stage="encode")
        check_room(self.spec, len(self.clients), client_id, "encode")  # as SummingServer does
        self.clients.append(client_id)
        if self._feed is None:
            self._local.encrypt_add(self.batch, 0, rows)
            return PendingUpdate(client_id, self.batch, self._nbytes)
        self._feed.collect(block=False)  # slots the helpers are done with
        tasks = [range(lo, hi, TASK_ROWS) for lo, hi in self._ranges]
        for k in range(max(len(t) for t in tasks)):  # round robin: every helper starts at once
            for h, starts in enumerate(tasks):
                if k < len(starts):
                    start = starts[k]
                    self._send(h, start, rows[start : min(start + TASK_ROWS,
                                                          self._ranges[h][1])])
        return PendingUpdate(client_id, self.batch, self._nbytes)

    def _send(self, h: int, start: int, part: np.ndarray) -> None:
        assert self._feed is not None
        if self._slots is None:
            self._feed.send(h, self.batch, start, part)
            return
        slot = self._slots.take()
        while slot is None:  # every slot in flight: wait for a helper to finish one
            if not self._feed.collect(block=True):
                raise CryptoError("every shared slot is taken, yet no task is in flight")
            slot = self._slots.take()
        try:
            self._slots.view[slot, : len(part)] = part
        except BaseException:  # e.g. interrupted: the slot was never sent
            self._slots.give(slot)
            raise
        self._feed.send(h, self.batch, start, slot, len(part))

    def flush(self) -> None:
        """Wait until the helpers have encrypted every update put; raises the first error,
        and then the round is abandoned (``abandon``)."""
        try:
            if self._feed is not None:
                self._feed.wait()
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Drop this round's updates and partial sums (after an error, or a round that was
        interrupted); the next update starts a new round."""
        if self._feed is not None:
            self._feed.discard()
        self._local.take(self.batch)
        self.batch += 1  # the helpers drop their sums when they see the next round's number
        self.clients = []

    def collect(self) -> list[bytes]:
        """This round's sum (serialized ciphertexts, in order): each helper's range, serialized
        there; the next round starts empty (also when collecting fails)."""
        self.flush()
        try:
            if self._feed is None:
                blobs = {i: save(ct) for i, ct in self._local.take(self.batch).items()}
            else:
                blobs = {}
                for part in self._pool.each(_helper_take, self.batch):
                    blobs.update(part)
        finally:
            self.batch += 1
            self.clients = []
        n = self.spec.n_ciphertexts
        if len(blobs) != n:
            raise CryptoError(f"the pool summed {len(blobs)} of {n} ciphertexts; a task was lost")
        return [blobs[i] for i in range(n)]

    def close(self) -> None:
        """Stop the helpers; the pool keeps working, serially."""
        super().close()
        self._feed = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None


class PooledEncoder(EncryptingClient):
    """Client role in simulation: ``EncryptingClient.encode``'s checks, clipping and packing, then
    the rows queued in the pool (returns a ``PendingUpdate``); ``flush()`` ends the round's
    encryption."""

    def __init__(self, key: PublicContext | KeyShare, workers: int, *,
                 seed: int | None = None, noise_seed: int | None = None) -> None:
        super().__init__(key, seed=seed, noise_seed=noise_seed)
        self.pool = PooledSum(self, key, workers)
        self.workers = self.pool.workers

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> Any:
        return self.pool.put(client_id, self.packed(client_id, delta, weight))

    def flush(self) -> None:
        self.pool.flush()

    def abandon(self) -> None:
        """Drop the round's updates queued so far (the round body calls it when a round is
        interrupted)."""
        self.pool.abandon()

    def dumps(self, update: Any) -> bytes:
        if isinstance(update, PendingUpdate):
            raise CryptoError("a pooled update lives in the simulation's helper processes and "
                              "has no bytes; deployed clients use EncryptingClient")
        return super().dumps(update)

    def close(self) -> None:
        self.pool.close()


class PooledSummer(SummingServer):
    """Server role in simulation: the pool's running sums (each helper's range), plus any other
    payload (bytes, ``EncryptedUpdate``) validated and added as ``SummingServer`` does."""

    def __init__(self, public: PublicContext, pool: PooledSum) -> None:
        super().__init__(public)
        self.pool = pool

    def validate(self, client_id: Hashable, payload: Any) -> None:
        if isinstance(payload, PendingUpdate):
            self._pending(client_id, payload)
        else:
            super().validate(client_id, payload)

    def _pending(self, cid: Hashable, payload: PendingUpdate) -> None:
        if payload.batch != self.pool.batch or cid not in self.pool.clients:
            raise UpdateRejected("a pooled update from another round (or never queued)",
                                 client_id=cid, stage="aggregate")

    def nbytes(self, payload: Any) -> int:
        if isinstance(payload, PendingUpdate):
            return payload.nbytes
        return super().nbytes(payload)

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        """Collect the pool's sums of exactly this round's pending updates (a running sum cannot
        leave one out: when ``payloads`` names only some, they are all rejected), then add the
        other payloads as ``SummingServer`` does."""
        pending = [c for c, p in payloads.items() if isinstance(p, PendingUpdate)]
        others = {c: p for c, p in payloads.items() if not isinstance(p, PendingUpdate)}
        rejected: dict[Hashable, str] = {}
        for cid in pending:
            try:
                self._pending(cid, payloads[cid])
            except UpdateRejected as e:
                rejected[cid] = e.reason
        queued = list(self.pool.clients)
        blobs = self.pool.collect() if queued else []
        ok = [c for c in pending if c not in rejected]
        if set(ok) != set(queued):  # (the pool queues at most max_clients)
            why = (f"the round's pooled sum holds {len(queued)} updates, not the {len(ok)} "
                   "given; it cannot leave one out")
            rejected.update({c: why for c in ok})
            blobs, ok = [], []
        if others:
            rest = super().aggregate(others)
            rejected.update(rest.rejected)
            extra = list(rest.payload.ciphertexts)
            if blobs and extra:
                acc = [self.seal.ciphertext(b) for b in blobs]
                for a, b in zip(acc, extra, strict=True):
                    self.seal.add_inplace(a, self.seal.ciphertext(b))
                extra = [save(a) for a in acc]
            blobs = extra or blobs
            ok += list(rest.contributors)
        total = EncryptedSum(self.spec.fingerprint, self.public.key_id, len(ok), tuple(blobs))
        return Aggregate(total, tuple(ok), rejected)


def auto_workers() -> int:
    """Processes for a pool: one per core this process may use (a ``PooledSum``'s helpers, a
    ``KeyHolder``'s processes)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def pooled_parts(key: PublicContext | KeyShare, public: PublicContext, workers: int, *,
                 seed: int | None = None) -> tuple[PooledEncoder, PooledSummer]:
    """The client and server roles sharing one pool of ``workers`` helper processes (raises
    ``ConfigError`` for fewer than 1)."""
    client = PooledEncoder(key, workers, seed=seed)
    return client, PooledSummer(public, client.pool)

