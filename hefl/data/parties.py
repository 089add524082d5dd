"""One table's rows split into parties, and the preprocessing they train with.

A bank's CSV (or a pandas DataFrame) becomes a federation in three steps, the same in simulation
(``hefl simulate --csv``) and for a deployment's demo data (``hefl split-data --csv``):

1. hold out a stratified test split (scored at the end, encrypted or not);
2. split the training rows into parties: one per value of a column (``by="job"``: each branch
   of the bank holds its own customers) or ``clients`` parties, iid or with Dirichlet label skew;
3. fit the preprocessing *without pooling rows*: column kinds and levels from the parties' data
   dictionary, means and standard deviations from summed statistics (``hefl.analytics``),
   through any aggregator (plaintext, or CKKS).

Party names are the column's values made safe for a token name (``admin.`` -> ``admin``), so
``split-data`` output can be handed to ``hefl certs --clients`` as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hefl.data.federated import ClientData, FederatedData
from hefl.data.partition import by_key, dirichlet, iid
from hefl.data.tabular import (
    Preprocessor,
    Table,
    check_complete,
    default_positive,
    stratified_split,
)
from hefl.errors import ConfigError, DataError

PARTITIONS = ("iid", "dirichlet")


def party_name(value: Any, taken: set[str] | None = None) -> str:
    """A token-safe name (``[A-Za-z0-9_-]``, at most 64 characters) for a party key, unique
    among ``taken`` (which it joins).

    Example:
        >>> taken = set()
        >>> party_name("admin.", taken), party_name("blue collar", taken), party_name("admin", taken)
        ('admin', 'blue-collar', 'admin-2')
    """
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", str(value)).strip("-")[:56] or "party"
    name, i = base, 1
    while taken is not None and name in taken:
        i += 1
        name = f"{base}-{i}"
    if taken is not None:
        taken.add(name)
    return name


def split_parties(
    table: Table,
    by: str | None = None,
    clients: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    target: str | None = None,
) -> dict[str, Table]:
    """Rows per party: one party per distinct value of column ``by`` (sorted), else
    ``clients`` parties (``partition``: ``iid``, or ``dirichlet`` label skew over ``target``).

    Raises:
        ConfigError: neither or both of ``by`` and ``clients``, or an unknown partition.
        DataError: ``by`` is not a column.
    """
    if (by is None) == (clients is None):
        raise ConfigError("split by a column (--partition-by COL) or into a number of clients "
                          f"(--clients N): {'not both' if by is not None else 'give one'}")
    taken: set[str] = set()
    if by is not None:
        groups = by_key(table[by])
        return {party_name(k, taken): table.take(ix) for k, ix in groups.items()}
    assert clients is not None
    if partition == "iid":
        parts = iid(len(table), clients, seed)
    elif partition == "dirichlet":
        if target is None:
            raise ConfigError("a dirichlet partition needs the target column")
        parts = dirichlet(table[target], clients, alpha, seed)
    else:
        raise ConfigError(f"unknown partition {partition!r}; choose one of: "
                          f"{', '.join(PARTITIONS)}")
    width = len(str(clients - 1))
    return {f"client-{i:0{width}d}": table.take(np.sort(ix)) for i, ix in enumerate(parts)}


def encode_parties(parties: Mapping[str, Table], pre: Preprocessor) -> FederatedData:
    """Each party's rows through the shared preprocessing: features and 0/1 labels."""
    return FederatedData(
        {k: ClientData(pre.transform(t), pre.labels(t)) for k, t in parties.items()},
        preprocessing=pre,
    )


@dataclass(frozen=True)
class TabularSplit:
    """A table as a federation: training rows per party, the held-out rows, the preprocessing.

    Attributes:
        parties: party name -> its training rows (raw strings, target included).
        test: the held-out rows (may be empty).
        preprocessing: fitted from the parties' summed statistics.
    """

    parties: Mapping[str, Table]
    test: Table
    preprocessing: Preprocessor

    def federated(self) -> FederatedData:
        return encode_parties(self.parties, self.preprocessing)

    def test_data(self) -> ClientData | None:
        if not len(self.test):
            return None
        pre = self.preprocessing
        return ClientData(pre.transform(self.test), pre.labels(self.test))


def split_table(
    table: Table,
    target: str,
    *,
    by: str | None = None,
    clients: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_size: float = 0.2,
    positive: str | None = None,
    make_aggregator: Callable[[int], Any] | None = None,
    preprocessing: Preprocessor | None = None,
) -> TabularSplit:
    """Hold out ``test_size`` of the rows (stratified by the label, seed ``seed``), split the
    rest with ``split_parties`` and fit the preprocessing with
    ``hefl.analytics.fit_preprocessing`` (``make_aggregator``: plaintext by default), unless
    ``preprocessing`` is given (a federation's agreed file).

    Raises:
        ConfigError: ``test_size`` outside [0, 1), or a bad split.
        DataError: the target is missing or not binary, a party is left with no rows, a text
            column has blanks, ...
    """
    from hefl.aggregation import PlainAggregator
    from hefl.analytics import fit_preprocessing

    if not 0.0 <= test_size < 1.0:
        raise ConfigError(f"test size must be in [0, 1), got {test_size}")
    labels = table.target(target)
    check_complete(table, target)  # row numbers of the whole table, before it is split
    positive = positive if positive is not None else default_positive(labels)
    if test_size > 0:
        tr, te = stratified_split((labels == positive).astype(np.int64), test_size, seed)
    else:
        tr, te = np.arange(len(table)), np.zeros(0, np.int64)
    train = table.take(tr)
    parties = split_parties(train, by, clients, partition, alpha, seed, target)
    empty = [k for k, t in parties.items() if not len(t)]
    if by is not None and empty:
        raise DataError(f"parties {empty} have no training rows; use fewer parties")
    pre = preprocessing or fit_preprocessing({k: t for k, t in parties.items() if len(t)},
                                             target, positive, make_aggregator or PlainAggregator)
    return TabularSplit(parties, table.take(te), pre)
