"""FederatedData: client id -> that client's arrays (and optionally its own test split)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hefl.errors import DataError


@dataclass(frozen=True)
class ClientData:
    """One client's examples: features ``x`` and labels ``y`` (same first dimension)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(
                f"client data has {len(self.x)} feature rows but {len(self.y)} labels; "
                "x and y must have the same first dimension"
            )

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FederatedData:
    """Training data per client, plus optional per-client test splits.

    Client order is the mapping's order; a client's *index* in that order is what seeds its
    local shuffling, so two runs over the same FederatedData are identical.

    Example:
        >>> import numpy as np
        >>> fd = FederatedData.from_indices(np.arange(6.0)[:, None], np.arange(6), [[0, 1], [2, 3, 4, 5]])
        >>> fd.ids, fd.sizes
        ((0, 1), (2, 4))
    """

    train: Mapping[Any, ClientData]
    test: Mapping[Any, ClientData] = field(default_factory=dict)

    @property
    def ids(self) -> tuple[Hashable, ...]:
        return tuple(self.train)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(d) for d in self.train.values())

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, client_id: Hashable) -> ClientData:
        return self.train[client_id]

    @classmethod
    def from_indices(
        cls,
        x: np.ndarray,
        y: np.ndarray,
        parts: Sequence[Iterable[int]] | Mapping[Hashable, Iterable[int]],
    ) -> FederatedData:
        """Build from a pooled data set and one index array per client."""
        items = parts.items() if isinstance(parts, Mapping) else enumerate(parts)
        train = {}
        for cid, idx in items:
            ix = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
            train[cid] = ClientData(x[ix], y[ix])
        return cls(train)
