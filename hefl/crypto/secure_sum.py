"""Encrypted aggregation: clients encrypt weighted updates, the server only adds ciphertexts.

Three party halves, each constructible from bytes alone so that deployment can run them in separate
processes (the gRPC layer needs only ``dumps``/``loads`` and the serialized contexts):

    client      EncryptingClient(key).encode(id, delta, weight) -> EncryptedUpdate  (.dumps: bytes)
    server      SummingServer(public).aggregate({id: update or bytes}) -> Aggregate(EncryptedSum)
    key holder  KeyHolder(share, min_clients).decode(sum) -> (mean delta, total weight)

``EncryptedAggregator`` bundles the three for simulation and implements
``hefl.aggregation.Aggregator``; ``make_aggregator`` builds one from a scheme name. The client's
weight is encrypted with its update (entry 0 of the packed vector), so the server learns neither the
update nor the sample count; the key holder learns only the sum and the total weight, and only for
``min_clients`` or more contributors.

Threat model: honest-but-curious server and key holder. Ciphertexts are not authenticated and carry
no range proof, so a malicious client can spoil a round or bias the mean *within* the bounds (e.g.
pack its values as if its weight were larger than the one it declares). What the aggregate reveals
is checked: the key holder refuses (``CryptoError``, with the count of coordinates out of range) a
total weight over the bound or any coordinate outside what clients of that total weight can send
(``hefl.crypto.packing.check_range``). Clients count what their clip cut (``last_clip``).

Example:
    >>> import numpy as np
    >>> agg = make_aggregator("bfv", 3, custody="keyholder", min_clients=2, seed=0)
    >>> ups = {c: agg.encode(c, np.full(3, v), 2.0) for c, v in {1: 0.25, 2: 0.75}.items()}
    >>> mean, w = agg.decode(agg.aggregate(ups))
    >>> np.round(mean, 3).tolist(), w
    ([0.5, 0.5, 0.5], 4.0)
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hefl.aggregation import Aggregate, PlainPayload, check_update
from hefl.crypto import threshold as multiparty
from hefl.crypto import wire
from hefl.crypto.flooding import FloodBudget
from hefl.crypto.keys import (
    KeyShare,
    PublicContext,
    fuse,
    key_ceremony,
    key_from_bytes,
    partial_decrypt,
)
from hefl.crypto.packing import ClipStats, check_noise, check_range, clip_update, pack, unpack
from hefl.crypto.seal import save
from hefl.crypto.spec import CUSTODY, DP_SHARE_UNITS, HeSpec, bfv_spec, ckks_spec, dp_share_units
from hefl.errors import (
    ConfigError,
    ContextMismatch,
    CryptoError,
    FloodBudgetSpent,
    KeyCustodyError,
    MemberUnavailable,
    RoundError,
    UpdateRejected,
)
from hefl.privacy.mechanisms import gaussian_noise
from hefl.roles import Scheme

log = logging.getLogger(__name__)

#: Ciphertexts per chunk shared with helper processes (``EncryptingClient``/``KeyHolder``
#: workers): a few milliseconds of SEAL work, and two runs of two chunks' results (public-key
#: ciphertexts at N = 4096, or slot values) within a pipe's 1 MiB buffer.
ENCRYPT_ROWS = 8
#: Bytes of ciphertexts per chunk a key holder's helper sums and decrypts
#: (``KeyHolder.decode_updates``: every update's blob of each ciphertext in the chunk; at least
#: one ciphertext of each), so that two chunks in flight fit a helper's 1 MiB pipe.
COLUMN_BYTES = 1 << 18
#: Threshold roles' chunks (``_Shared``, one per run): at N = 4096 about 0.4 MB of ciphertexts
#: and 0.25 MB of results.
THRESHOLD_ROWS = 4

MAGIC_UPDATE = b"HEFLUPD1"
MAGIC_SUM = b"HEFLSUM1"


@dataclass(frozen=True)
class EncryptedUpdate:
    """One client's encrypted, weighted update: SEAL ciphertext bytes, stamped with the parameter
    fingerprint and key id."""

    fingerprint: bytes
    key_id: bytes
    ciphertexts: tuple[bytes, ...] = field(repr=False)

    def to_bytes(self) -> bytes:
        return MAGIC_UPDATE + self.fingerprint + self.key_id + wire.blobs(self.ciphertexts)


@dataclass(frozen=True)
class EncryptedSum:
    """The server's sum of ``count`` encrypted updates (what the key holder receives)."""

    fingerprint: bytes
    key_id: bytes
    count: int
    ciphertexts: tuple[bytes, ...] = field(repr=False)

    def to_bytes(self) -> bytes:
        return (MAGIC_SUM + self.fingerprint + self.key_id + wire.u32(self.count)
                + wire.blobs(self.ciphertexts))


def _blob_limit(spec: HeSpec) -> int:
    """Largest ciphertext accepted: two uncompressed polynomials plus SEAL's header, doubled."""
    return 2 * (2 * 8 * spec.poly_degree * spec.n_primes + 4096)


def _check_stamp(
    spec: HeSpec, key_id: bytes, fingerprint: bytes, got_key: bytes, what: str
) -> None:
    if fingerprint != spec.fingerprint:
        raise ContextMismatch(
            f"{what} was made under other HE parameters (fingerprint {fingerprint.hex()}, "
            f"expected {spec.fingerprint.hex()}); the sender must use this federation's context"
        )
    if got_key != key_id:
        raise ContextMismatch(
            f"{what} was encrypted under another key (key id {got_key.hex()}, expected "
            f"{key_id.hex()}); the sender must use this federation's key"
        )


def parse_update(spec: HeSpec, key_id: bytes, data: bytes) -> EncryptedUpdate:
    """Parse and check one client's update bytes (framing, parameters, key, length).

    Raises:
        UpdateRejected: not an update, truncated, oversized, or the wrong number of ciphertexts.
        ContextMismatch: made under other parameters or another key.
    """
    plain_size = 8 + 8 * spec.size  # what PlainAggregator.dumps writes for this model
    if (isinstance(data, (bytes, bytearray)) and len(data) == plain_size
            and bytes(data[:8]) != MAGIC_UPDATE[:8]):
        raise UpdateRejected(
            "received a plaintext update where a ciphertext was expected; the client must "
            "encrypt (run it with the federation's HE context)",
            stage="decode",
        )
    r = wire.Reader(data, "encrypted update", MAGIC_UPDATE)
    fp, kid = r.take(16), r.take(16)
    _check_stamp(spec, key_id, fp, kid, "encrypted update")
    cts = r.blobs(spec.n_ciphertexts, _blob_limit(spec))
    r.end()
    return EncryptedUpdate(fp, kid, tuple(cts))


def parse_sum(spec: HeSpec, key_id: bytes, data: bytes) -> EncryptedSum:
    """Parse and check an encrypted sum's bytes (as ``parse_update``)."""
    r = wire.Reader(data, "encrypted sum", MAGIC_SUM)
    fp, kid = r.take(16), r.take(16)
    _check_stamp(spec, key_id, fp, kid, "encrypted sum")
    count = r.u32()
    cts = r.blobs(spec.n_ciphertexts if count else 0, _blob_limit(spec))
    r.end()
    return EncryptedSum(fp, kid, count, tuple(cts))


class EncryptingClient:
    """Client half: clip, quantize/scale, weight, pack and encrypt an update.

    Args:
        key: the shared ``KeyShare`` when clients hold the key (symmetric spec), else the
            ``PublicContext`` with the public key (key-holder custody).
        seed: seeds stochastic rounding (None: fresh OS entropy).
        noise_seed: distributed DP (``spec.dp_mu``): seeds this client's Skellam noise, for
            reproducible simulations only; None (the default, and always in deployment) draws it
            from OS entropy, and ``reseed`` never touches it (a seed another party knows would
            let it subtract the noise).
        workers: encrypt ciphertexts in this many processes, this one included (1: only this
            one; ``hefl.crypto.workers.HelperPool``). The helper processes are this client's own
            children and receive its key once, at start, over a private pipe; call ``close()``
            (or let the client be collected) to stop them.

    Attributes:
        last_clip: what clipping did to the last update ``encode`` accepted (``ClipStats``:
            values cut to ``+-clip``, out of how many, the L2 norm and the L2 scale factor), or
            None before the first one. The first update that is clipped logs one warning on
            ``hefl.crypto.secure_sum``; later ones log at DEBUG (a deployed client can log its
            own event from ``last_clip.changed`` after each ``encode``).
    """

    def __init__(
        self, key: PublicContext | KeyShare, *, seed: int | None = None, workers: int = 1,
        noise_seed: int | None = None,
    ) -> None:
        spec = key.spec
        if spec.symmetric and not isinstance(key, KeyShare):
            raise KeyCustodyError(
                "these parameters have clients hold the secret key (symmetric encryption); give "
                "the client its KeyShare from the key ceremony"
            )
        if not spec.symmetric and isinstance(key, KeyShare):
            raise KeyCustodyError(
                "in key-holder custody clients must not hold the secret key; give the client "
                "the PublicContext"
            )
        if isinstance(key, PublicContext) and not key.public_key:
            raise KeyCustodyError("the public context carries no public key to encrypt with")
        self.spec = spec
        self.key_id = key.key_id
        self.seal = key.seal
        if isinstance(key, KeyShare):
            self._encryptor = self.seal.encryptor(key.seal_key())
        else:
            self._encryptor = self.seal.encryptor(self.seal.load_public_key(key.public_key))
        self._rng = np.random.default_rng(seed)
        self._noise_rng = np.random.default_rng(noise_seed)
        self.dp_units = DP_SHARE_UNITS  # distributed DP: this round's noise share (``expect``)
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self._key_bytes = key.to_bytes() if workers > 1 else b""
        self.workers = workers
        self._pool: Any = None
        self.last_clip: ClipStats | None = None
        self._warned = False

    def _encrypt_all(self, chunks: np.ndarray) -> tuple[bytes, ...]:
        if self.workers == 1 or len(chunks) < 2 * self.workers:
            return tuple(self.seal.encrypt(self._encryptor, c) for c in chunks)
        if self._pool is None:
            from hefl.crypto.workers import HelperPool

            self._pool = HelperPool(self.workers, _init_worker, (self._key_bytes,))
        rows = ENCRYPT_ROWS
        parts = [(chunks[i : i + rows],) for i in range(0, len(chunks), rows)]
        return tuple(b for part in self._pool.map(_encrypt_part, self.encrypt_rows, parts,
                                                  most=2) for b in part)

    def encrypt_rows(self, chunks: np.ndarray) -> list[bytes]:
        """Packed rows (``packed``) encrypted here, as the bytes an upload carries."""
        return [self.seal.encrypt(self._encryptor, c) for c in chunks]

    def ciphertexts(self, chunks: np.ndarray) -> list[Any]:
        """Packed rows encrypted here as SEAL ciphertext objects (full, never serialized: for
        sums kept in this process, ``hefl.crypto.pooled``)."""
        return [self.seal.encrypt_full(self._encryptor, c) for c in chunks]

    def reseed(self, seed: int) -> None:
        """Draw stochastic rounding from ``default_rng(seed)`` from now on."""
        self._rng = np.random.default_rng(seed)

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> EncryptedUpdate:
        """Encrypt ``weight * clip(delta)`` and the weight; record the clipping in ``last_clip``.

        With ``spec.clip_norm`` set, ``delta`` is first scaled to L2 norm at most ``clip_norm``
        (only here, in the encrypted client: plaintext aggregation does not clip).

        Raises:
            UpdateRejected: wrong length, NaN/Inf, or a weight outside [0, max_weight].
        """
        chunks = self.packed(client_id, delta, weight)
        return EncryptedUpdate(self.spec.fingerprint, self.key_id, self._encrypt_all(chunks))

    def packed(self, client_id: Hashable, delta: np.ndarray, weight: float) -> np.ndarray:
        """What ``encode`` encrypts: the checked, clipped, quantized and packed update, one row
        of slot values per ciphertext (raises as ``encode``)."""
        spec = self.spec
        self.last_clip = None  # never left describing an earlier update if this one is refused
        d = check_update(client_id, delta, spec.size, weight)
        w = float(weight)
        if spec.scheme == "bfv" and w != round(w):
            raise UpdateRejected(
                f"weight {weight} is not an integer; BFV aggregation weights by integer sample "
                "counts (use scheme 'ckks' for fractional weights)",
                client_id=client_id, stage="encode",
            )
        if (spec.dp_mu or spec.dp_std) and w != 1:
            raise UpdateRejected(
                f"weight {weight}: with differential privacy every client counts once (weight 1); "
                "wrap the scheme with hefl.privacy (DP-FedAvg weighs clients equally)",
                client_id=client_id, stage="encode",
            )
        if w > spec.max_weight:
            raise UpdateRejected(
                f"weight {weight} exceeds the supported total weight {spec.max_weight}; build the "
                "aggregator with a larger max_weight",
                client_id=client_id, stage="encode",
            )
        d, self.last_clip = clip_update(d, spec)
        self._report_clip(client_id, self.last_clip)
        return pack(d, w, spec, self._rng, self._noise_rng,
                    self.seal.plain_modulus if spec.dp_mu else 0, self.dp_units)

    def expect(self, count: int) -> None:
        """Distributed DP: the round's announced number of contributions (fewer than
        ``spec.dp_min`` count as ``dp_min``: such a sum is refused anyway). This client's noise
        share becomes ``Sk(dp_mu * dp_min / count)`` (``dp_share_units``, rounded up), so ``count`` of them carry the planned
        ``Sk(dp_mu * dp_min)`` whatever the Poisson sample's size, and the share is written
        into the ciphertext: a sum of fewer than announced carries less, and whoever decrypts
        refuses it (``check_noise``). Threshold custody keeps the share for ``dp_min`` (the
        coordinator fuses the partial decryptions, so only the count it claims is checked
        before release). No effect without ``dp_mu``.
        """
        if self.spec.dp_mu and not self.spec.parties:
            self.dp_units = dp_share_units(self.spec.dp_min, max(int(count), self.spec.dp_min))

    def _report_clip(self, client_id: Hashable, stats: ClipStats) -> None:
        """Log a clipped update: a warning the first time for this client, then DEBUG."""
        if not stats.changed:
            return
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(
            level,
            "client %r: %d of %d values clipped to +-%g, L2 norm %.4g scaled by %.4g; clipping "
            "biases the mean toward zero: raise clip/clip_norm or lower the client learning rate "
            "(further clipping by this encoder is logged at DEBUG)",
            client_id, stats.clipped, stats.of, self.spec.clip, stats.norm, stats.scaled,
        )

    def dumps(self, update: EncryptedUpdate) -> bytes:
        return update.to_bytes()


_worker: EncryptingClient | None = None


def _init_worker(key_bytes: bytes) -> None:
    """Runs once in each encryption worker process: rebuild this client's encryptor."""
    global _worker
    _worker = EncryptingClient(key_from_bytes(key_bytes))


def _encrypt_part(chunks: np.ndarray) -> list[bytes]:
    assert _worker is not None
    return _worker.encrypt_rows(chunks)


class SummingServer:
    """Server half: validates encrypted updates and adds them. Holds no key at all.

    Args:
        public: the federation's ``PublicContext`` (passing a ``KeyShare`` is refused).
    """

    def __init__(self, public: PublicContext) -> None:
        if not isinstance(public, PublicContext):
            raise KeyCustodyError(
                f"the server takes a PublicContext, got {type(public).__name__}; the server must "
                "never hold the secret key"
            )
        self.public = public
        self.spec = public.spec
        self.seal = public.seal

    @classmethod
    def from_bytes(cls, public: bytes) -> SummingServer:
        return cls(PublicContext.from_bytes(public))

    def loads(self, data: bytes) -> EncryptedUpdate:
        """Parse one client's update bytes (raises ``UpdateRejected``/``ContextMismatch``)."""
        return parse_update(self.spec, self.public.key_id, data)

    def validate(self, client_id: Hashable, payload: Any) -> None:
        """Check one update as it arrives: an ``EncryptedUpdate`` under this federation's
        parameters and key, with one ciphertext per packed chunk. Raises ``UpdateRejected`` or
        ``ContextMismatch``. (Each ciphertext is parsed once, when ``aggregate`` adds it.)"""
        self._checked(client_id, payload)

    def _checked(self, cid: Hashable, payload: Any) -> EncryptedUpdate:
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = self.loads(bytes(payload))
        if isinstance(payload, (PlainPayload, np.ndarray)):
            raise UpdateRejected(
                "received a plaintext update where a ciphertext was expected; the client must "
                "encrypt", client_id=cid, stage="aggregate",
            )
        if not isinstance(payload, EncryptedUpdate):
            raise UpdateRejected(
                f"expected an encrypted update, got {type(payload).__name__}",
                client_id=cid, stage="aggregate",
            )
        _check_stamp(self.spec, self.public.key_id, payload.fingerprint, payload.key_id,
                     "encrypted update")
        if len(payload.ciphertexts) != self.spec.n_ciphertexts:
            raise UpdateRejected(
                f"update holds {len(payload.ciphertexts)} ciphertexts, expected "
                f"{self.spec.n_ciphertexts}: the vector does not match the model",
                client_id=cid, stage="aggregate",
            )
        return payload

    def _ciphertexts(self, cid: Hashable, payload: Any) -> list[Any]:
        return [self.seal.ciphertext(b) for b in self._checked(cid, payload).ciphertexts]

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        """Sum valid updates; each bad one is left out with its reason (never raises for one).

        At most ``spec.max_clients`` updates are summed (the bound that keeps the sum exact);
        further ones are rejected.
        """
        total = self.running()
        rejected: dict[Hashable, str] = {}
        for cid, payload in payloads.items():
            try:
                total.add(cid, payload)
            except (UpdateRejected, CryptoError) as e:
                rejected[cid] = e.reason if isinstance(e, UpdateRejected) else str(e)
        return total.aggregate(payloads, rejected)

    def running(self, *, keep: bool = True) -> RunningSum:
        """An empty sum that updates are added to as they arrive (``RunningSum``; ``keep``:
        whether it sums them or only checks them)."""
        return RunningSum(self, keep=keep)

    def dumps(self, total: EncryptedSum) -> bytes:
        return total.to_bytes()

    def nbytes(self, payload: EncryptedUpdate) -> int:
        return len(payload.to_bytes())


def check_room(spec: HeSpec, held: int, client_id: Hashable, stage: str) -> None:
    """Refuse one more update (``UpdateRejected``) to a sum that already holds ``held`` of them
    when that is ``spec.max_clients``: the most its parameters sum exactly."""
    if held >= spec.max_clients:
        raise UpdateRejected(
            f"this aggregate already holds max_clients={spec.max_clients} contributions, the "
            "most its parameters sum exactly; rebuild the aggregator with a larger max_clients",
            client_id=client_id, stage=stage)


class RunningSum:
    """A round's sum of encrypted updates, added to as each one arrives: a deployed server adds
    an update when it accepts it, so the sum is ready when the round closes. Ciphertexts are
    loaded (and so checked by SEAL) once, outside the lock; additions are exact, so the order
    of arrival does not matter. ``add`` may be called from several threads.

    With ``keep=False`` the updates are checked as they arrive but not summed, and the round
    closes with an ``Aggregate`` whose payload is None: for a deployment whose key holder
    recomputes the sum from the signed updates (``hefl.net.decrypt``), where the server's own
    sum would never be read (only threshold members fuse their partials with it).
    """

    def __init__(self, summer: SummingServer, *, keep: bool = True) -> None:
        self.summer = summer
        self.keep = keep
        self._lock = threading.Lock()
        self._acc: list[Any] | None = None
        self._added: dict[Hashable, Any] = {}  # id -> the payload object added
        self._spoiled = False  # an id added twice: only a fresh sum can be trusted

    def add(self, client_id: Hashable, payload: Any) -> None:
        """Add one update. Raises ``UpdateRejected`` (malformed, or ``max_clients`` updates
        are in already) or ``CryptoError`` (SEAL refused a ciphertext); then nothing is added."""
        if client_id not in self._added:  # before loading: a full sum refuses at once
            self._check_room(client_id)
        cts = self.summer._ciphertexts(client_id, payload)
        seal = self.summer.seal
        with self._lock:
            if client_id in self._added:
                self._spoiled = True
                return
            self._check_room(client_id)  # again: another thread may have added meanwhile
            if self.keep:  # else only checked
                if self._acc is None:
                    self._acc = cts
                else:
                    for a, c in zip(self._acc, cts, strict=True):
                        seal.add_inplace(a, c)
            self._added[client_id] = payload

    def _check_room(self, client_id: Hashable) -> None:
        check_room(self.summer.spec, len(self._added), client_id, "aggregate")

    def aggregate(self, payloads: Mapping[Hashable, Any],
                  rejected: Mapping[Hashable, str] | None = None) -> Aggregate:
        """The sum of ``payloads`` (``Summer.aggregate``): this one when they are exactly the
        updates added (the same objects; ``rejected``: those that failed to add), else the
        summer's own sum of them (an update added after its round closed, or added twice).
        Not kept (``keep=False``): the same contributors and rejections, payload None."""
        with self._lock:
            rejected = dict(rejected or {})
            ok = [c for c in payloads if c in self._added]
            exact = (not self._spoiled and len(ok) == len(self._added)
                     and all(payloads[c] is self._added[c] for c in ok)
                     and all(c in rejected for c in payloads if c not in self._added))
            if exact and self.keep:
                blobs = tuple(save(c) for c in self._acc) if self._acc is not None else ()
        if not exact:
            return self.summer.aggregate(payloads)
        if not self.keep:
            return Aggregate(None, tuple(ok), rejected)
        s = self.summer
        total = EncryptedSum(s.spec.fingerprint, s.public.key_id, len(ok), blobs)
        return Aggregate(total, tuple(ok), rejected)


class KeyHolder:
    """Key-holder half: decrypts an aggregate of at least ``min_clients`` contributions.

    In custody "clients" each client can play this role with its own ``KeyShare``.

    ``workers`` > 1 loads and decrypts the sum's ciphertexts in that many processes, this one
    included (``hefl.crypto.workers.HelperPool``, started at the first ``decode``): the helpers
    are this key holder's own children and receive its key once over a private pipe. Every
    check, the flooding budget and any DP noise stay here; CKKS ciphertexts are flooded where
    they are decrypted, with fresh OS entropy in each process. ``close()`` stops them.
    """

    def __init__(self, share: KeyShare, *, min_clients: int = 2, workers: int = 1) -> None:
        if not isinstance(share, KeyShare):
            raise KeyCustodyError(f"the key holder needs a KeyShare, got {type(share).__name__}")
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        self.share = share
        self.spec = share.spec
        self.min_clients = min_clients
        self._shared = _Shared(workers, _init_decryptor, share.to_bytes, rows=ENCRYPT_ROWS,
                               most=2)
        self.workers = workers
        self.budget = FloodBudget(self.spec)  # CKKS: decryptions answered under this key
        self._noise_rng = np.random.default_rng()  # central DP: OS entropy, never a seed

    def _decrypt(self, blobs: Sequence[bytes]) -> np.ndarray:
        """The slots of ``blobs`` (loaded, flooded if CKKS, decrypted), in ``workers``
        processes when there are enough to share."""
        return self._shared.run(_decrypt_part, lambda b: _decrypt_blobs(self.share, b), blobs)

    def close(self) -> None:
        """Stop the decryption helpers, if any."""
        self._shared.close()

    @classmethod
    def from_bytes(cls, share: bytes, *, min_clients: int = 2) -> KeyHolder:
        return cls(KeyShare.from_bytes(share), min_clients=min_clients)

    def loads(self, data: bytes) -> EncryptedSum:
        return parse_sum(self.spec, self.share.key_id, data)

    def decode(self, total: EncryptedSum | Aggregate | bytes) -> tuple[np.ndarray, float]:
        """The weighted mean update and the total weight.

        Raises:
            KeyCustodyError: fewer than ``min_clients`` contributions.
            RoundError: nothing to average (no contributor or total weight 0).
            FloodBudgetSpent: CKKS: this key answered ``flood_queries`` decryptions already.
            CryptoError: the total weight exceeds the supported bound, or coordinates lie outside
                what clients of that total weight can send (``check_range``: a client lied about
                its weight or a lane wrapped); the aggregate is discarded.
        """
        total = open_sum(self.spec, self.share.key_id, total, self.min_clients)
        self.budget.spend(len(total.ciphertexts))
        return self._mean(self._decrypt(total.ciphertexts), total.count)

    def decode_updates(self, updates: Mapping[Hashable, EncryptedUpdate]
                       ) -> tuple[np.ndarray, float]:
        """``decode`` of the sum of ``updates`` (each already checked, as
        ``SummingServer.validate`` checks it), made here in one pass per range of ciphertexts:
        loaded, added and decrypted in ``workers`` processes, the sum never serialized. The
        deployed key holder runs it on the updates the server says it summed
        (``hefl.net.decrypt``).

        Raises:
            UpdateRejected: SEAL refused a ciphertext (``client_id``: that update's key).
            KeyCustodyError, RoundError, FloodBudgetSpent, CryptoError: as ``decode``.
        """
        ids = list(updates)
        check_count(self.spec, len(ids), self.min_clients)
        n = self.spec.n_ciphertexts
        if any(len(updates[c].ciphertexts) != n for c in ids):
            raise CryptoError(f"every update must hold {n} ciphertexts")
        columns = [tuple(updates[c].ciphertexts[k] for c in ids) for k in range(n)]
        self.budget.spend(n)
        blob = max(len(b) for b in columns[0]) if columns else 1
        try:
            slots = self._shared.run(_sum_decrypt_part,
                                     lambda cs: _sum_decrypt(self.share, cs), columns,
                                     rows=max(1, COLUMN_BYTES // (blob * len(ids))), most=1)
        except UpdateRejected as e:  # client_id is the update's position
            raise UpdateRejected(e.reason, client_id=ids[int(e.client_id)],  # type: ignore[call-overload]
                                 stage="aggregate") from e
        return self._mean(slots, len(ids))

    def _mean(self, slots: np.ndarray, count: int) -> tuple[np.ndarray, float]:
        """The checked weighted mean of a decrypted sum of ``count`` updates (central DP noise
        added here, if the spec has it)."""
        check_range(self.spec, slots)
        mean, weight = weighted_mean(self.spec, slots, count)
        if not self.spec.dp_std:
            return mean, weight
        # central DP (hefl.privacy): noise on the sum, here, before anything leaves
        check_unit_weights(self.spec, weight, count)
        noisy = mean * weight + gaussian_noise(self._noise_rng, mean.size, self.spec.dp_std)
        return noisy / weight, weight


def _decrypt_blobs(share: KeyShare, blobs: Sequence[bytes]) -> np.ndarray:
    cts = [share.seal.ciphertext(b) for b in blobs]
    return fuse(share.spec, [partial_decrypt(share, cts)])


def _sum_decrypt(share: KeyShare, columns: Sequence[Sequence[bytes]]) -> np.ndarray:
    """Decrypted slots of the sum of each column (one ciphertext of every update, in order).
    Raises ``UpdateRejected`` with the refused update's position as ``client_id``."""
    seal, cts = share.seal, []
    for col in columns:
        acc = None
        for j, b in enumerate(col):
            try:
                ct = seal.ciphertext(b)
            except CryptoError as e:
                raise UpdateRejected(str(e), client_id=j, stage="aggregate") from None
            if acc is None:
                acc = ct
            else:
                seal.add_inplace(acc, ct)
        cts.append(acc)
    return fuse(share.spec, [partial_decrypt(share, cts)])


def _sum_decrypt_part(columns: Sequence[Sequence[bytes]]) -> np.ndarray:
    assert _decryptor is not None
    return _sum_decrypt(_decryptor, columns)


_decryptor: KeyShare | None = None


def _init_decryptor(share_bytes: bytes) -> None:
    """Runs once in each decryption helper process: load the key holder's share."""
    global _decryptor
    _decryptor = KeyShare.from_bytes(share_bytes)


def _decrypt_part(blobs: Sequence[bytes]) -> np.ndarray:
    assert _decryptor is not None
    return _decrypt_blobs(_decryptor, blobs)


def open_sum(spec: HeSpec, key_id: bytes, total: EncryptedSum | Aggregate | bytes,
             min_clients: int) -> EncryptedSum:
    """What every decrypting party checks before it decrypts: an ``EncryptedSum`` under this
    key and parameters, of at least ``min_clients`` and at most ``max_clients`` contributions.

    Raises:
        KeyCustodyError: not a sum, or fewer than ``min_clients`` contributions.
        CryptoError: more than ``max_clients`` contributions.
    """
    if isinstance(total, Aggregate):
        total = total.payload
    if isinstance(total, (bytes, bytearray, memoryview)):
        total = parse_sum(spec, key_id, bytes(total))
    if not isinstance(total, EncryptedSum):
        raise KeyCustodyError(
            f"the key holder decrypts only sums of updates (EncryptedSum), got "
            f"{type(total).__name__}"
        )
    _check_stamp(spec, key_id, total.fingerprint, total.key_id, "encrypted sum")
    check_count(spec, total.count, min_clients)
    return total


def check_count(spec: HeSpec, count: int, min_clients: int) -> None:
    """The contribution count every decrypting party requires (``open_sum``): at least
    ``min_clients`` (and ``dp_min``), at most ``max_clients``."""
    if spec.dp_min and count < spec.dp_min:
        raise KeyCustodyError(
            f"refusing to decrypt an aggregate of {count} contribution(s): the distributed "
            f"DP noise is sized for at least {spec.dp_min}, so fewer would be released with less "
            "noise than the privacy guarantee needs; the round is skipped (it still counts "
            "against the budget)"
        )
    if count < min_clients:
        raise KeyCustodyError(
            f"refusing to decrypt an aggregate of {count} contribution(s): at least "
            f"min_clients={min_clients} are required so no small group's update is "
            "revealed; wait for more clients"
        )
    if count > spec.max_clients:
        raise CryptoError(
            f"aggregate claims {count} contributions, more than max_clients="
            f"{spec.max_clients}; it cannot be decrypted correctly"
        )


def check_unit_weights(spec: HeSpec, weight: float, count: int) -> None:
    """DP's sensitivity holds only if every contribution had weight 1.

    Raises:
        CryptoError: the total weight is not the number of contributions.
    """
    if abs(weight - count) > max(0.5, 16 * spec.error_bound * count):
        raise CryptoError(
            f"the sum of {count} DP contribution(s) has total weight {weight:g}: under "
            "differential privacy every client sends weight 1 (its clip bounds its share); a "
            "client built without the DP plan sent this round; the aggregate is discarded")


def weighted_mean(spec: HeSpec, slots: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """The mean update and total weight from range-checked plaintext slots.

    Raises:
        RoundError: nothing to average (total weight 0).
    """
    check_noise(spec, slots)
    weighted_sum, weight = unpack(slots, spec)
    if weight <= 0:
        raise RoundError(
            f"no usable client updates this round ({count} contributors, total weight "
            f"{weight:g}); sample more clients per round"
        )
    weighted_sum /= weight  # unpack's own array: divided in place
    return weighted_sum, weight


class ThresholdKeyHolder:
    """One member of a threshold committee: checks an aggregate as a key holder does
    (``open_sum``), spends its flooding budget and returns its partial decryption for the
    decrypting set it is asked to join. It never sees the plaintext."""

    def __init__(self, share: KeyShare, *, min_clients: int = 2, workers: int = 1) -> None:
        if not isinstance(share, KeyShare) or share.parties < 2:
            raise KeyCustodyError("a threshold key holder needs its KeyShare from a threshold "
                                  "ceremony (hefl.crypto.threshold)")
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        self.share = share
        self.party = share.party
        self.spec = share.spec
        self.min_clients = min_clients
        self.budget = FloodBudget(self.spec)
        self._shared = _Shared(workers, _init_member, share.to_bytes, rows=THRESHOLD_ROWS, most=1)

    @property
    def workers(self) -> int:
        return self._shared.workers

    def partial(self, total: EncryptedSum | Aggregate | bytes, members: Sequence[int]
                ) -> multiparty.ThresholdPartial:
        """This member's partial decryption of ``total`` for the decrypting set ``members``
        (with ``workers`` > 1, the ciphertexts are loaded and partially decrypted in that many
        processes; the checks and the flooding budget stay here)."""
        total = open_sum(self.spec, self.share.key_id, total, self.min_clients)
        ms = multiparty.check_members(self.spec, members)
        if self.share.party not in ms:
            raise KeyCustodyError(f"key holder {self.party} is not in the decrypting set {ms}")
        self.budget.spend(len(total.ciphertexts))
        key = multiparty.partial_key(self.share, ms)

        def local(blobs: Sequence[bytes], _: tuple[int, ...]) -> np.ndarray:
            cts = [self.share.seal.ciphertext(b) for b in blobs]
            return multiparty.partial_values(self.share, key, cts)

        values = self._shared.run(_partial_part, local, total.ciphertexts, lambda i, j: (ms,))
        return multiparty.ThresholdPartial(self.party, self.share.key_id, ms, values)

    def close(self) -> None:
        """Stop the helpers, if any."""
        self._shared.close()


class _Shared:
    """A lazily started ``HelperPool`` over chunks of an aggregate's ciphertexts, for the
    decrypting roles (``KeyHolder``, ``ThresholdKeyHolder``, ``Committee``).

    Args:
        workers: processes, this one included (1: serially).
        initializer: run once in each helper with ``state()`` (the role's key bytes).
        rows: ciphertexts per chunk; ``most``: chunks per run (``HelperPool.map``), so that two
            runs' messages and results fit a helper's 1 MiB pipes.
    """

    def __init__(self, workers: int, initializer: Any, state: Any, *, rows: int,
                 most: int) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers, self._init, self._state = workers, initializer, state
        self.rows, self.most = rows, most
        self.pool: Any = None

    def run(self, remote: Any, local: Any, blobs: Sequence[Any],
            extra: Any = lambda i, j: (), rows: int | None = None,
            most: int | None = None) -> np.ndarray:
        """``local(blobs[i:j], *extra(i, j))`` here or ``remote(...)`` in a helper for each
        chunk of ``rows`` (default: the pool's; ``most`` chunks per run), concatenated in order;
        one ``local`` call over all of them when there are too few ciphertexts to share (fewer
        than 4 per process)."""
        if self.workers == 1 or len(blobs) < 4 * self.workers:
            return np.asarray(local(blobs, *extra(0, len(blobs))))
        if self.pool is None:
            from hefl.crypto.workers import HelperPool

            self.pool = HelperPool(self.workers, self._init, (self._state(),))
        n = rows or self.rows
        parts = [(list(blobs[i : i + n]), *extra(i, i + n)) for i in range(0, len(blobs), n)]
        return np.concatenate(self.pool.map(remote, local, parts, most=most or self.most))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


_member: tuple[KeyShare, dict[tuple[int, ...], Any]] | None = None


def _init_member(share_bytes: bytes) -> None:
    """Runs once in each helper of a threshold member: its share (and, per decrypting set, its
    ``lambda sigma``)."""
    global _member
    _member = (KeyShare.from_bytes(share_bytes), {})


def _partial_part(blobs: Sequence[bytes], members: tuple[int, ...]) -> np.ndarray:
    """A helper's partial decryption of one chunk (its ``lambda sigma`` made once per set)."""
    assert _member is not None
    share, keys = _member
    if members not in keys:
        keys[members] = multiparty.partial_key(share, members)
    cts = [share.seal.ciphertext(b) for b in blobs]
    return multiparty.partial_values(share, keys[members], cts)


_fuser: PublicContext | None = None


def _init_fuser(public_bytes: bytes) -> None:
    global _fuser
    _fuser = PublicContext.from_bytes(public_bytes)


def _fuse_part(blobs: Sequence[bytes], values: list[np.ndarray]) -> np.ndarray:
    assert _fuser is not None
    seal = _fuser.seal
    return multiparty.fuse_values(seal, values, [seal.ciphertext(b) for b in blobs])


class Committee:
    """Threshold decryption as a ``KeyHolder``: asks ``threshold`` members for partials, fuses
    them and checks the result (whoever fuses learns only the aggregate).

    Members that raise ``MemberUnavailable`` (or ``ConnectionError``/``TimeoutError``) are
    skipped; decryption needs ``threshold`` that answer. When a fused result fails the range
    checks, other decrypting sets are tried: the members in every failing set and not in the
    passing one are named in ``suspects`` (logged). When no set passes nobody can be named. Retrying spends each
    member's flooding budget like any decryption.

    Args:
        public: the collective public context.
        members: one ``ThresholdKeyHolder`` per key holder (or anything with ``party`` and
            ``partial(total, members)``: a remote member in deployment).
    """

    MAX_SETS = 64

    def __init__(self, public: PublicContext, members: Sequence[Any], *,
                 workers: int = 1) -> None:
        self.public = public
        self.spec = public.spec
        self._shared = _Shared(workers, _init_fuser, public.to_bytes, rows=THRESHOLD_ROWS, most=1)
        self.members = {m.party: m for m in members}
        if sorted(self.members) != list(range(1, self.spec.parties + 1)):
            raise KeyCustodyError(
                f"the committee needs key holders 1..{self.spec.parties}, got "
                f"{sorted(self.members)}"
            )
        self.suspects: tuple[int, ...] = ()

    def loads(self, data: bytes) -> EncryptedSum:
        return parse_sum(self.spec, self.public.key_id, data)

    def decode(self, total: EncryptedSum | Aggregate | bytes) -> tuple[np.ndarray, float]:
        """The weighted mean and total weight (raises as ``KeyHolder.decode``, and
        ``KeyCustodyError`` when fewer than ``threshold`` members answer)."""
        total = open_sum(self.spec, self.public.key_id, total, 1)
        blobs = total.ciphertexts
        seal = self.public.seal
        for b in blobs:  # every one loads under these parameters before a member is asked
            seal.ciphertext(b)
        t = self.spec.threshold
        down: set[int] = set()
        failed: list[tuple[int, ...]] = []
        errors: list[str] = []
        for ms in itertools.islice(itertools.combinations(sorted(self.members), t),
                                   self.MAX_SETS):
            if down & set(ms):
                continue
            partials = []
            for m in ms:
                try:
                    partials.append(self.members[m].partial(total, ms))
                except (MemberUnavailable, ConnectionError, TimeoutError):
                    down.add(m)
                    break
            if len(partials) < t:
                continue
            try:
                slots = self._fuse(partials, blobs)
                check_range(self.spec, slots)
            except CryptoError as e:
                failed.append(ms)
                errors.append(str(e))
                continue
            self._name(failed, ms)
            return weighted_mean(self.spec, slots, total.count)
        if len(set(self.members) - down) < t:
            raise KeyCustodyError(
                f"only {len(self.members) - len(down)} of {len(self.members)} key holders "
                f"answered (missing: {sorted(down)}); decryption needs threshold={t}"
            )
        raise CryptoError(
            f"no decrypting set of the key holders that answered gave a valid aggregate (the "
            f"fused result failed the checks: {errors[-1]}); at least one key holder returned "
            "an invalid partial decryption, and with no valid set to compare it cannot be named"
        )

    def _fuse(self, partials: list[multiparty.ThresholdPartial], blobs: Sequence[bytes]
              ) -> np.ndarray:
        """``multiparty.fuse``, in ``workers`` processes when there are enough ciphertexts."""
        multiparty.check_partials(self.spec, partials, len(blobs))
        seal = self.public.seal

        def local(part: Sequence[bytes], values: list[np.ndarray]) -> np.ndarray:
            return multiparty.fuse_values(seal, values, [seal.ciphertext(b) for b in part])

        return self._shared.run(_fuse_part, local, blobs,
                                lambda i, j: ([p.values[i:j] for p in partials],))

    @property
    def workers(self) -> int:
        return self._shared.workers

    def close(self) -> None:
        """Stop the helpers, if any (the members' own are theirs to close)."""
        self._shared.close()
        for m in self.members.values():
            close = getattr(m, "close", None)
            if close is not None:
                close()

    def _name(self, failed: list[tuple[int, ...]], passing: tuple[int, ...]) -> None:
        """Suspects: members in every failing set and not in the passing one."""
        common = set(failed[0]).intersection(*map(set, failed[1:])) if failed else set()
        self.suspects = tuple(sorted(common - set(passing)))
        if self.suspects:
            log.warning("key holder(s) %s returned invalid partial decryptions; the aggregate "
                        "was decrypted without them", list(self.suspects))


class EncryptedAggregator:
    """The three halves bundled for simulation; implements ``hefl.aggregation.Aggregator``.

    ``decode`` turns a key-custody refusal or an unusable aggregate into ``RoundError`` (the round
    is skipped and the model kept), since in simulation one refusal must not end the run; the
    ``KeyHolder`` alone raises ``KeyCustodyError``.
    """

    def __init__(self, client: EncryptingClient, server: SummingServer,
                 key_holder: KeyHolder | Committee, custody: str) -> None:
        self.client = client
        self.server = server
        self.key_holder = key_holder
        self.custody = custody
        self.spec = server.spec
        self.workers = client.workers
        self.size = self.spec.size

    @property
    def roles(self) -> Scheme:
        """Client, server and key holder as separate parties (``hefl.roles``)."""
        return Scheme(self.spec.scheme, self.client, self.server, self.key_holder)

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> Any:
        return self.client.encode(client_id, delta, weight)

    def flush(self) -> None:
        """Finish the encryption of the updates encoded so far (a no-op unless pooled)."""
        flush = getattr(self.client, "flush", None)
        if flush is not None:
            flush()

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        return self.server.aggregate(payloads)

    def close(self) -> None:
        """Stop the client's and the key holder's helper processes, if any."""
        self.client.close()
        close = getattr(self.key_holder, "close", None)
        if close is not None:
            close()

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        try:
            return self.key_holder.decode(aggregate)
        except FloodBudgetSpent:
            raise  # the run cannot go on under this key: stop, do not skip rounds forever
        except (KeyCustodyError, CryptoError) as e:
            raise RoundError(str(e)) from e

    def nbytes(self, payload: Any) -> int:
        return self.server.nbytes(payload)

    def dumps(self, payload: Any) -> bytes:
        if isinstance(payload, EncryptedSum):
            return payload.to_bytes()
        return self.client.dumps(payload)

    def loads(self, data: bytes) -> EncryptedUpdate:
        return self.server.loads(data)

    def __repr__(self) -> str:
        s = self.spec
        return (f"EncryptedAggregator({s.scheme}, size={s.size}, custody={self.custody!r}, "
                f"N={s.poly_degree}, q={s.coeff_bits} bits, lanes={s.lanes})")


#: Scheme names accepted by ``make_aggregator`` (e.g. ``hefl simulate --he NAME``): the scheme and
#: the default options of that preset (explicit options override them).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "bfv": ("bfv", {}),  # 16-bit values, total weight <= 2**16: error < 3.1e-5
    "bfv-packed": ("bfv", {"bits": 12, "max_weight": 2**10}),  # 2 per slot: error < 4.9e-4
    "ckks": ("ckks", {}),  # complex-packed, one prime: error ~1e-11, fractional weights
}


#: Committee of a threshold key set when ``make_aggregator`` is not told: 2 of 3.
DEFAULT_COMMITTEE = (3, 2)


def make_spec(scheme: str, size: int, *, custody: str = "clients",
              key_holders: int | None = None, threshold: int | None = None,
              **options: Any) -> HeSpec:
    """The ``HeSpec`` for a scheme or preset name and custody mode (options as ``bfv_spec`` /
    ``ckks_spec``; ``key_holders`` and ``threshold`` for custody ``"threshold"``, default 2 of
    3)."""
    if custody not in CUSTODY:
        raise ConfigError(f"unknown key custody {custody!r}; choose one of {CUSTODY}")
    if scheme not in PRESETS:
        raise ConfigError(f"unknown HE scheme {scheme!r}; choose one of {', '.join(PRESETS)}")
    base, defaults = PRESETS[scheme]
    build = bfv_spec if base == "bfv" else ckks_spec
    committee: dict[str, int] = {}
    if custody == "threshold":
        n = DEFAULT_COMMITTEE[0] if key_holders is None else int(key_holders)
        t = min(DEFAULT_COMMITTEE[1], n) if threshold is None else int(threshold)
        committee = {"parties": n, "threshold": t}
    elif key_holders is not None or threshold is not None:
        raise ConfigError("key_holders and threshold apply only to custody 'threshold'")
    flood = () if committee else ("flood_security", "flood_queries")
    only = {"bfv": ("coeff_bits", *flood), "ckks": ("bits", "lanes", "dp_mu", "dp_min")}
    wrong = sorted(set(options) & set(only[base]))
    if wrong:
        raise ConfigError(f"option(s) {', '.join(wrong)} do not apply to {base.upper()}"
                          f"{'' if committee else ' outside custody threshold'}; drop them or "
                          "choose the other scheme")
    if committee and scheme == "bfv-packed":
        raise ConfigError("the bfv-packed preset's two lanes leave no room for the threshold "
                          "flooding noise; use 'bfv' (or 'ckks') with custody threshold")
    dp_std = float(options.pop("dp_std", 0.0))
    spec = build(size, symmetric=custody == "clients", **{**defaults, **options}, **committee)
    return replace(spec, dp_std=dp_std) if dp_std else spec


def make_aggregator(
    scheme: str,
    size: int,
    *,
    custody: str = "clients",
    min_clients: int = 2,
    seed: int | None = None,
    key_holders: int | None = None,
    threshold: int | None = None,
    workers: int | None = 1,
    **options: Any,
) -> EncryptedAggregator:
    """An encrypted aggregator for simulation (runs the key ceremony in-process).

    Args:
        scheme: a preset name: ``"bfv"`` (the default choice), ``"bfv-packed"`` (two values per
            slot, coarser) or ``"ckks"``; see ``PRESETS``.
        size: number of model parameters.
        custody: ``"clients"`` (clients share the secret key; server gets a public context),
            ``"keyholder"`` (a separate key holder; clients encrypt with the public key) or
            ``"threshold"`` (``key_holders`` members generate the key together and any
            ``threshold`` of them decrypt; no party holds the key; ``hefl.crypto.threshold``).
        min_clients: the key holder refuses aggregates of fewer contributions.
        seed: seeds the clients' stochastic rounding (None: OS entropy).
        workers: helper processes that encrypt and sum the clients' updates as they arrive
            while this one trains (``hefl.crypto.pooled``: in-memory handoff, streaming
            summation; the results are the serial path's), and the key holder's processes
            (this one included) that decrypt; 1: serially, through the wire format; None: one
            per core (``pooled.auto_workers``).
        options: ``bits``, ``clip``, ``clip_norm``, ``max_weight``, ``max_clients`` (and
            ``lanes`` for BFV, ``coeff_bits`` for CKKS); see ``hefl.crypto.spec``.
    """
    spec = make_spec(scheme, size, custody=custody, key_holders=key_holders,
                     threshold=threshold, **options)
    if workers is None:
        from hefl.crypto.pooled import auto_workers

        workers = auto_workers()
    key_holder: KeyHolder | Committee
    if custody == "threshold":
        ceremony = multiparty.threshold_ceremony(spec)
        key_holder = Committee(ceremony.public,
                               [ThresholdKeyHolder(sh, min_clients=min_clients, workers=workers)
                                for sh in ceremony.shares], workers=workers)
        client_key: PublicContext | KeyShare = ceremony.public
    else:
        ceremony = key_ceremony(spec)
        key_holder = KeyHolder(ceremony.shares[0], min_clients=min_clients,
                               workers=workers)
        client_key = ceremony.shares[0] if spec.symmetric else ceremony.public
    if workers != 1:
        from hefl.crypto.pooled import pooled_parts

        client, server = pooled_parts(client_key, ceremony.public, workers, seed=seed)
        return EncryptedAggregator(client, server, key_holder, custody)
    return EncryptedAggregator(EncryptingClient(client_key, seed=seed),
                               SummingServer(ceremony.public), key_holder, custody)
