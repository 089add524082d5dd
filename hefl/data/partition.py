"""Partitioners: split a pooled data set into clients, reproducibly (explicit seeds).

Each returns one index array per client; ``FederatedData.from_indices`` turns them into data.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from hefl.errors import ConfigError


def _check_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"number of clients must be >= 1, got {num_clients}")


def iid(n: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and cut it into ``num_clients`` near-equal parts."""
    _check_clients(num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(y: np.ndarray, num_clients: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Label-skew split: each class is shared among clients in Dirichlet(alpha) proportions.

    Exactly workload W1's procedure: for each class k in sorted order, shuffle that class's
    indices, draw ``p ~ Dir(alpha * 1_N)``, cut at ``(cumsum(p) * n_k).astype(int)[:-1]`` and give
    chunk c to client c. One ``default_rng(seed)`` drives every draw. Empty clients are allowed.

    Example:
        >>> parts = dirichlet(np.repeat(np.arange(3), 10), num_clients=4, alpha=0.5, seed=0)
        >>> sum(len(p) for p in parts)
        30
    """
    _check_clients(num_clients)
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        rng.shuffle(idx)
        p = rng.dirichlet(alpha * np.ones(num_clients))
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for c, part in enumerate(np.split(idx, cuts)):
            chunks[c].append(part)
    return [np.concatenate(c) if c else np.zeros(0, np.int64) for c in chunks]


def by_key(keys: np.ndarray) -> dict[Hashable, np.ndarray]:
    """One client per distinct key (e.g. a bank's ``job`` column), in sorted key order."""
    keys = np.asarray(keys)
    return {
        k.item() if hasattr(k, "item") else k: np.flatnonzero(keys == k) for k in np.unique(keys)
    }


PARTITIONS = ("iid", "dirichlet")
