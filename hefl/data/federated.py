"""FederatedData: client id -> that client's arrays (and optionally its own test split)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hefl.errors import DataError

if TYPE_CHECKING:
    from hefl.data.tabular import Preprocessor


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

    ``preprocessing`` is set when the features came from a table (``from_frame``): the
    transform that turns a party's raw rows, or records to score, into ``x``.

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
    preprocessing: Preprocessor | None = field(default=None, compare=False)

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

    @classmethod
    def from_frame(
        cls,
        frame: Any,
        target: str,
        by: str | None = None,
        *,
        clients: int | None = None,
        partition: str = "iid",
        alpha: float = 0.5,
        seed: int = 0,
        positive: str | None = None,
        drop: Sequence[str] = (),
        preprocessing: Preprocessor | None = None,
    ) -> FederatedData:
        """A federation from a table: a pandas DataFrame (or ``hefl.data.tabular.Table``),
        one client per value of column ``by`` or ``clients`` clients (``partition``: iid or
        dirichlet). Text columns are one-hot encoded and numeric ones standardised; unless
        ``preprocessing`` is given it is fitted from the clients' summed statistics
        (``hefl.analytics.fit_preprocessing``), never from pooled rows, and kept as
        ``.preprocessing``. Every row is training data: hold out a test split first (or use
        ``hefl.data.parties.split_table``).

        Example:
            >>> import pandas as pd  # doctest: +SKIP
            >>> df = pd.read_csv("bank.csv", sep=";")  # doctest: +SKIP
            >>> fd = FederatedData.from_frame(df, target="y", by="job")  # doctest: +SKIP
        """
        from hefl.data.parties import split_table
        from hefl.data.tabular import Table

        table = Table.from_frame(frame)
        split = split_table(table.drop(*drop) if drop else table, target, by=by,
                            clients=clients, partition=partition, alpha=alpha, seed=seed,
                            test_size=0.0, positive=positive, preprocessing=preprocessing)
        return split.federated()
