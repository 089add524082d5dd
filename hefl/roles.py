"""The parties of one aggregation, as typed roles; a *scheme* is a bundle of the three.

    client      Encoder.encode(id, delta, weight) -> payload;  Encoder.dumps(payload) -> bytes
    server      Summer.loads(bytes) -> payload;  Summer.validate(id, payload)   (one, as it arrives)
                Summer.aggregate({id: payload}) -> Aggregate;  Summer.dumps(sum) -> bytes
    key holder  Decoder.decode(Aggregate) -> (mean delta, total weight)

The server holds only a ``Summer``: it never has a secret key, so it can validate and add
contributions but not read them. Plaintext aggregation (``hefl.aggregation.PlainAggregator``), BFV
and CKKS (``hefl.crypto``) differ only in which roles fill the bundle; the round body
(``hefl.rounds``) calls the roles, never a scheme's internals.

Example:
    >>> import numpy as np
    >>> from hefl.aggregation import PlainAggregator
    >>> s = as_scheme(PlainAggregator(size=2))
    >>> payloads = {c: s.encoder.encode(c, np.full(2, v), 1.0) for c, v in {"a": 1.0, "b": 3.0}.items()}
    >>> for cid, p in payloads.items():
    ...     s.summer.validate(cid, p)
    >>> s.decoder.decode(s.summer.aggregate(payloads))[0].tolist()
    [2.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from hefl.errors import ConfigError

if TYPE_CHECKING:
    from hefl.aggregation import Aggregate


@runtime_checkable
class Encoder(Protocol):
    """Client role: a delta and its weight -> what is sent to the server."""

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> Any:
        """Raises ``UpdateRejected`` for a malformed delta or weight."""
        ...

    def dumps(self, payload: Any) -> bytes:
        """Serialize a payload for the wire (never pickle)."""
        ...

    def reseed(self, seed: int) -> None:
        """Make the encoding's randomness (stochastic rounding) a function of ``seed`` from
        now on, so that a rerun reproduces the same payloads. A no-op for exact encodings."""
        ...


@runtime_checkable
class Summer(Protocol):
    """Server role: parse, validate and add payloads; never needs (or holds) a secret."""

    def loads(self, data: bytes) -> Any:
        """Parse wire bytes; raises ``UpdateRejected`` (or ``CryptoError``) for malformed ones."""
        ...

    def validate(self, client_id: Hashable, payload: Any) -> None:
        """Check one payload as it arrives; raises ``UpdateRejected`` with the reason."""
        ...

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        """Sum the payloads; any that fail validation are left out with their reasons."""
        ...

    def dumps(self, total: Any) -> bytes:
        """Serialize an aggregate's payload (what a remote key holder receives)."""
        ...

    def nbytes(self, payload: Any) -> int:
        """Bytes one client uploads for this payload."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """Key-holder role: an aggregate -> the weighted mean delta and the total weight."""

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        """Raises ``RoundError`` (or ``CryptoError``) when the aggregate cannot or must not be
        decoded; the round is then skipped with that reason."""
        ...


@dataclass(frozen=True)
class Scheme:
    """One aggregation scheme as its three roles. ``decoder`` is None on a party that cannot
    decode (a deployed server in encrypted mode; its decoder is a remote key holder)."""

    name: str
    encoder: Encoder
    summer: Summer
    decoder: Decoder | None


def as_scheme(aggregator: Any) -> Scheme:
    """The roles of an aggregator (``PlainAggregator``, ``make_aggregator(...)``) or a Scheme.

    Raises:
        ConfigError: ``aggregator`` is neither.
    """
    if isinstance(aggregator, Scheme):
        return aggregator
    roles = getattr(aggregator, "roles", None)
    if isinstance(roles, Scheme):
        return roles
    raise ConfigError(
        f"{type(aggregator).__name__} is not an aggregation scheme; pass PlainAggregator(size), "
        "hefl.crypto.make_aggregator(...) or a hefl.roles.Scheme"
    )
