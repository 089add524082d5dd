"""Encrypted aggregation in simulation across CPU cores, as the clients finish training.

In a simulation every party lives in one process, so the clients' ciphertexts need not be
serialized for the server to add them: that is the in-memory transport of DESIGN.md. A
``PooledSum`` is this process plus ``workers - 1`` helper processes (``hefl.crypto.workers``),
each holding the clients' encryption key and a running sum per ciphertext:

    client      PooledEncoder.encode(id, delta, weight)  clip, quantize, pack here (as
                EncryptingClient), then copy the packed rows into shared-memory slots
                (``SharedSlots``; where every slot is in flight, this process encrypts the
                task itself); a helper encrypts them in place while this process trains the
                next client, and adds each ciphertext to its own running sum at once
                (streaming summation; nothing is kept per client)
                PooledEncoder.flush()   this process encrypts what is still queued
    server      PooledSummer.aggregate(pending updates)  merges the processes' running sums
                (one serialization per ciphertext per process per round, not per client) into
                an ``EncryptedSum``, the very bytes a deployed server would send
    key holder  unchanged: ``KeyHolder.decode`` / ``Committee.decode`` of that sum

The results are those of the serial path: the packing (and so the stochastic rounding and any DP
noise) is done here, in the clients' order, from the same generators; BFV sums are then equal
exactly, CKKS sums to within the encryption noise. An update is encrypted under the same key
and parameters by the same SEAL calls; only where it is added differs. Upload bytes are what a
real upload would carry, estimated: the framing plus the ciphertext count times the size of
three serialized sample ciphertexts (SEAL's zstd sizes of a ciphertext vary by about 0.2 %);
``hefl simulate`` says so. Bytes, anything not made by this encoder (a test's attack payload, a real
``EncryptedUpdate``) go through ``SummingServer`` as in deployment and are added to the merged
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
)
from hefl.crypto.workers import HelperPool, SharedSlots, TaskStream, UsesHelpers
from hefl.errors import CryptoError, UpdateRejected

#: Ciphertexts per task: large enough that a task's dispatch is a small share of its time
#: (about 35 ms of SEAL encryption at N = 2048), small enough that the last client's rows
#: spread over every process.
TASK_ROWS = 128
#: Shared memory for rows in flight (``SharedSlots``): at most 4 tasks per helper, in at most
#: this many bytes (at least 2 tasks per helper, the two each has in flight).
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


def _give_slot(slots: SharedSlots, batch: int, start: int, slot: int, n: int) -> None:
    slots.give(slot)


def _helper_take(batch: int) -> dict[int, bytes]:
    assert _helper is not None
    return {i: save(ct) for i, ct in _helper.take(batch).items()}


class PooledSum(UsesHelpers):
    """The pool shared by a ``PooledEncoder`` and a ``PooledSummer``: this process and
    ``workers - 1`` helpers, each with the clients' key and running sums."""

    def __init__(self, client: EncryptingClient, key: PublicContext | KeyShare,
                 workers: int) -> None:
        self.spec = key.spec
        self._local = _Sums(client)  # this process encrypts with the encoder's own encryptor
        self._slots = self._shared_slots(workers)
        slots = self._slots
        self._pool = HelperPool(
            workers, _init_helper,
            (key.to_bytes(),) if slots is None else
            (key.to_bytes(), (slots.fd, slots.shape[0], slots.shape[1:], slots.dtype.str)),
            share=() if slots is None else (slots.fd,))
        if not self._pool.parallel and self._slots is not None:
            self._slots.close()
            self._slots = None
        if self._slots is not None:  # rows by shared memory, two tasks in flight per helper
            self._stream = TaskStream(self._pool, _helper_encrypt_slot, self._local_slot,
                                      depth=2, done=functools.partial(_give_slot, self._slots))
        else:  # serially, or rows pickled through the pipes
            self._stream = TaskStream(self._pool, _helper_encrypt_add, self._local.encrypt_add)
        self.batch = 0
        self.clients: list[Hashable] = []  # this round's queued updates, in order
        self._nbytes = self._local.upload_bytes(self.spec.n_ciphertexts)

    def _shared_slots(self, workers: int) -> SharedSlots | None:
        if workers < 2:
            return None
        rows = min(TASK_ROWS, self.spec.n_ciphertexts)
        shape = (rows, self.spec.slot_values)
        dtype = np.uint64 if self.spec.scheme == "bfv" else np.float64
        helpers = workers - 1
        fit = SLOT_BUDGET // SharedSlots.nbytes(shape, dtype)
        return SharedSlots.create(max(2 * helpers, fit), shape, dtype)

    def _local_slot(self, batch: int, start: int, slot: int, n: int) -> None:
        assert self._slots is not None
        self._local.encrypt_add(batch, start, self._slots.view[slot, :n])

    @property
    def workers(self) -> int:
        return self._pool.workers

    def put(self, client_id: Hashable, rows: np.ndarray) -> PendingUpdate:
        """Queue one client's packed rows for encryption into this round's sums."""
        if client_id in self.clients:
            raise UpdateRejected("this client already queued an update this round",
                                 client_id=client_id, stage="encode")
        if len(self.clients) >= self.spec.max_clients:  # as SummingServer.aggregate refuses it
            raise UpdateRejected(
                f"this aggregate already holds max_clients={self.spec.max_clients} "
                "contributions, the most its parameters sum exactly; rebuild the aggregator "
                "with a larger max_clients", client_id=client_id, stage="encode")
        self.clients.append(client_id)
        for start in range(0, len(rows), TASK_ROWS):
            part = rows[start : start + TASK_ROWS]
            if self._slots is None:
                self._stream.put(self.batch, start, part)
                continue
            slot = self._slots.take()
            if slot is None:
                self._stream.pump()  # replies free slots
                slot = self._slots.take()
            if slot is None:  # every slot in flight: this process encrypts the part, now
                self._local.encrypt_add(self.batch, start, part)
            else:
                self._slots.view[slot, : len(part)] = part
                self._stream.put(self.batch, start, slot, len(part))
        return PendingUpdate(client_id, self.batch, self._nbytes)

    def flush(self) -> None:
        """Encrypt what is still queued (here and in the helpers); raises the first error, and
        then the round is abandoned (``abandon``)."""
        try:
            self._stream.drain()
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Drop this round's queued updates and partial sums (after an error, or a round that
        was interrupted); the next update starts a new round."""
        self._stream.discard()
        self._local.take(self.batch)
        self.batch += 1  # the helpers drop their sums when they see the next round's number
        self.clients = []

    def collect(self) -> list[Any]:
        """This round's sum (ciphertexts in order), merged from the processes' running sums;
        the next round starts empty (also when merging fails)."""
        self.flush()
        seal = self._local.client.seal
        acc = self._local.take(self.batch)  # this process's sums need no serialization
        try:
            for blobs in self._pool.each(_helper_take, self.batch):
                for i, b in blobs.items():
                    ct = seal.ciphertext(b)
                    if i in acc:
                        seal.add_inplace(acc[i], ct)
                    else:
                        acc[i] = ct
        finally:
            self.batch += 1
            self.clients = []
        if len(acc) != self.spec.n_ciphertexts:
            raise CryptoError(f"the pool summed {len(acc)} of {self.spec.n_ciphertexts} "
                              "ciphertexts; a task was lost")
        return [acc[i] for i in range(len(acc))]

    def close(self) -> None:
        self._stream.close()
        super().close()
        if self._slots is not None:
            self._slots.close()


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
    """Server role in simulation: the pool's running sums merged, plus any other payload
    (bytes, ``EncryptedUpdate``) validated and added as ``SummingServer`` does."""

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
        """Merge the pool's sums of exactly this round's pending updates (a running sum cannot
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
        acc = self.pool.collect() if queued else []
        ok = [c for c in pending if c not in rejected]
        if set(ok) != set(queued):  # (the pool queues at most max_clients)
            why = (f"the round's pooled sum holds {len(queued)} updates, not the {len(ok)} "
                   "given; it cannot leave one out")
            rejected.update({c: why for c in ok})
            acc, ok = [], []
        if others:
            rest = super().aggregate(others)
            rejected.update(rest.rejected)
            extra = [self.seal.ciphertext(b) for b in rest.payload.ciphertexts]
            if acc and extra:
                for a, c in zip(acc, extra, strict=True):
                    self.seal.add_inplace(a, c)
            acc = acc or extra
            ok += list(rest.contributors)
        total = EncryptedSum(self.spec.fingerprint, self.public.key_id, len(ok),
                             tuple(save(c) for c in acc))
        return Aggregate(total, tuple(ok), rejected)


def auto_workers() -> int:
    """Processes for a pool: one per core this process may use (measured on 2 cores: W1 config
    b's 5-ciphertext updates 36.9 -> 19.3 ms per round, W2's 3,225 23.2 -> 11.2 s)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def pooled_parts(key: PublicContext | KeyShare, public: PublicContext, workers: int, *,
                 seed: int | None = None) -> tuple[PooledEncoder, PooledSummer]:
    """The client and server roles sharing one pool of ``workers`` processes (raises
    ``ConfigError`` for fewer than 1, as ``HelperPool``)."""
    client = PooledEncoder(key, workers, seed=seed)
    return client, PooledSummer(public, client.pool)

