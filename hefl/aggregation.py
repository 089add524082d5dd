"""The aggregation seam: how client deltas become one averaged delta.

An aggregator has three halves, one per party, so that plaintext and encrypted aggregation differ
only in which aggregator is plugged in:

    client:      payload   = agg.encode(client_id, delta, weight)    # e.g. encrypt weight*delta
    server:      aggregate = agg.aggregate({client_id: payload})     # e.g. add ciphertexts
    key holder:  mean, total_weight = agg.decode(aggregate)          # e.g. decrypt and divide

``aggregate`` validates every payload and leaves out (with the reason) those that fail, so one bad
client never stops the round.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hefl.errors import RoundError, UpdateRejected
from hefl.roles import Scheme


@dataclass(frozen=True)
class Aggregate:
    """What the server holds after summing contributions.

    Attributes:
        payload: the summed (possibly encrypted) weighted delta and weight.
        contributors: ids whose payloads were summed.
        rejected: id -> reason, for payloads left out.
    """

    payload: Any
    contributors: tuple[Hashable, ...]
    rejected: Mapping[Hashable, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.contributors)


@runtime_checkable
class Aggregator(Protocol):
    """Client / server / key-holder halves of secure or plain aggregation."""

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> Any:
        """Client side: turn a delta and its weight into what is sent to the server."""
        ...

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        """Server side: validate and sum payloads; never needs a secret."""
        ...

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        """Key-holder side: the weighted mean delta and the total weight."""
        ...

    def nbytes(self, payload: Any) -> int:
        """Bytes one client uploads for this payload (its serialized size)."""
        ...

    def dumps(self, payload: Any) -> bytes:
        """Serialize a payload for the wire (never pickle)."""
        ...

    def loads(self, data: bytes) -> Any:
        """Parse wire bytes; raises ``UpdateRejected`` for anything malformed."""
        ...


def check_update(client_id: Hashable, delta: np.ndarray, size: int, weight: float) -> np.ndarray:
    """Validate one client's delta and weight; return the delta as float64.

    Raises:
        UpdateRejected: wrong shape, NaN/Inf, or a negative/non-finite weight.
    """
    d = np.asarray(delta)
    shape_error = _shape_error(d, size)
    if shape_error is not None:
        raise UpdateRejected(shape_error, client_id=client_id, stage="aggregate")
    if not np.isfinite(d).all():
        bad = int((~np.isfinite(d)).sum())
        raise UpdateRejected(
            f"update contains {bad} NaN/Inf values; lower the client learning rate or clip",
            client_id=client_id,
            stage="aggregate",
        )
    if not _good_weight(weight):
        raise UpdateRejected(
            f"weight {weight!r} is not a finite non-negative number",
            client_id=client_id,
            stage="aggregate",
        )
    return d.astype(np.float64, copy=False)


def _shape_error(d: np.ndarray, size: int) -> str | None:
    """What is wrong with an update's shape or dtype (not its values), or None."""
    if d.ndim != 1 or d.shape[0] != size:
        return f"update has shape {d.shape}, expected ({size},); it was made for another model"
    if d.dtype.kind != "f":
        return f"update has dtype {d.dtype}, expected floating point"
    return None


def _good_weight(weight: float) -> bool:
    return bool(np.isfinite(weight) and weight >= 0)


@dataclass(frozen=True)
class PlainPayload:
    """A plaintext contribution: the weighted delta and its weight."""

    weighted_delta: np.ndarray
    weight: float


class PlainAggregator:
    """Weighted mean in the clear (the server sees each update).

    Example:
        >>> import numpy as np
        >>> agg = PlainAggregator(size=3)
        >>> p = {c: agg.encode(c, np.asarray(v, float), 2.0) for c, v in
        ...      {1: [1.5, 1.5, 1.5], 2: [5.5, 5.5, 5.5]}.items()}
        >>> mean, w = agg.decode(agg.aggregate(p))
        >>> mean.tolist(), w
        ([3.5, 3.5, 3.5], 4.0)
    """

    def __init__(self, size: int) -> None:
        self.size = size

    @property
    def roles(self) -> Scheme:
        """Plaintext needs no secret: this one object plays all three roles."""
        return Scheme("plain", self, self, self)

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> PlainPayload:
        d = check_update(client_id, delta, self.size, weight)
        return PlainPayload(d * weight, float(weight))

    def reseed(self, seed: int) -> None:
        """Plaintext encoding is exact: nothing random to seed."""

    def validate(self, client_id: Hashable, payload: Any) -> None:
        """Raises ``UpdateRejected`` unless ``payload`` is a well-formed plaintext payload."""
        if not isinstance(payload, PlainPayload):
            raise UpdateRejected(
                f"expected a plaintext payload, got {type(payload).__name__}",
                client_id=client_id,
                stage="aggregate",
            )
        check_update(client_id, payload.weighted_delta, self.size, payload.weight)

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        """Sum the valid payloads; leave out (with the reason) those ``check_update`` rejects.

        Every payload is checked: shape, dtype and weight one by one, the values all at once
        (NaN and Inf propagate through a sum, so a finite sum means finite payloads). Only when
        this pass finds a problem are the payloads checked and summed one by one, which names
        the bad ones and gives the sum of the others, as if the bad ones had never been sent."""
        fast = self._sum_if_all_valid(payloads)
        return fast if fast is not None else self._aggregate_one_by_one(payloads)

    def _sum_if_all_valid(self, payloads: Mapping[Hashable, Any]) -> Aggregate | None:
        """The aggregate when every payload passes ``check_update``, else None."""
        total = np.zeros(self.size)
        weight = 0.0
        with np.errstate(over="ignore", invalid="ignore"):  # a bad sum only means: look closer
            for p in payloads.values():
                if not (
                    type(p) is PlainPayload
                    and type(p.weighted_delta) is np.ndarray
                    and p.weighted_delta.dtype.itemsize <= 8  # sums exactly as its float64 copy
                    and _shape_error(p.weighted_delta, self.size) is None
                    and _good_weight(p.weight)
                ):
                    return None
                total += p.weighted_delta
                weight += p.weight
        if not np.isfinite(total).all():
            return None
        return Aggregate(PlainPayload(total, weight), tuple(payloads), {})

    def _aggregate_one_by_one(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        total = np.zeros(self.size)
        weight = 0.0
        ok: list[Hashable] = []
        rejected: dict[Hashable, str] = {}
        for cid, p in payloads.items():
            try:
                self.validate(cid, p)
            except UpdateRejected as e:
                rejected[cid] = e.reason
                continue
            total += np.asarray(p.weighted_delta, dtype=np.float64)
            weight += p.weight
            ok.append(cid)
        return Aggregate(PlainPayload(total, weight), tuple(ok), rejected)

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        p = aggregate.payload
        return mean_from_sum(p.weighted_delta, p.weight, aggregate.count)

    def nbytes(self, payload: Any) -> int:
        """float64 on the wire, plus the weight."""
        return int(payload.weighted_delta.size) * 8 + 8

    def dumps(self, payload: PlainPayload) -> bytes:
        """Little-endian float64 weight, then the weighted delta as float64: exact, so that a
        deployed server sums bit for bit what a simulation sums (plaintext is the non-private
        baseline; its size is not the point)."""
        head = np.float64(payload.weight).astype("<f8").tobytes()
        return head + np.asarray(payload.weighted_delta, "<f8").tobytes()

    def loads(self, data: bytes) -> PlainPayload:
        expected = 8 + 8 * self.size
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != expected:
            got = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else type(data)
            raise UpdateRejected(
                f"plaintext payload has {got} bytes, expected {expected} for {self.size} "
                "parameters; it was truncated, padded, or made for another model",
                stage="decode",
            )
        weight = float(np.frombuffer(data[:8], "<f8")[0])
        return PlainPayload(np.frombuffer(data[8:], "<f8").astype(np.float64), weight)


def mean_from_sum(weighted_sum: np.ndarray, weight: float, count: int) -> tuple[np.ndarray, float]:
    """Divide a weighted sum by its total weight.

    Raises:
        RoundError: no contributor, or total weight 0 (nothing to average).
    """
    if count == 0 or weight <= 0:
        raise RoundError(
            f"no usable client updates this round ({count} contributors, total weight {weight}); "
            "sample more clients per round or check why updates were rejected"
        )
    return np.asarray(weighted_sum, dtype=np.float64) / weight, float(weight)
