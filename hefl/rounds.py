"""One federated round, as pure steps shared by simulation and deployment.

    ids     = sample_clients(num_clients, per_round, seed, round)        server
    config  = fit_config(algorithm, seed, round, index)                  server -> client
    payload = client_payload(aggregator, id, global, fit_result)          client
    agg     = aggregator.aggregate(payloads)                             server
    params, opt_state = server_step(algorithm, aggregator, agg, ...)     key holder + server

Only how payloads travel differs between backends (in-process, Ray, gRPC).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hefl.aggregation import Aggregate, Aggregator
from hefl.algorithms import Algorithm
from hefl.client import FitConfig, FitRes
from hefl.errors import ConfigError


def sample_clients(num_clients: int, per_round: int, seed: int, round_num: int) -> list[int]:
    """Indices of the clients taking part in round ``round_num`` (1-based).

    All clients if ``per_round >= num_clients``, else
    ``sorted(default_rng([seed, round]).choice(N, per_round, replace=False))`` (workload W1).
    """
    if num_clients < 1:
        raise ConfigError("there are no clients: the federated data set is empty")
    if per_round < 1:
        raise ConfigError(f"clients per round must be >= 1, got {per_round}")
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_num])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def shuffle_seed(seed: int, round_num: int, index: int) -> int:
    """Seed of a client's local shuffling: ``round * 1_000_003 + index`` for seed 0 (W1)."""
    return (seed * 7_919 + round_num) * 1_000_003 + index


def fit_config(algorithm: Algorithm, seed: int, round_num: int, index: int) -> FitConfig:
    c = algorithm.client
    return FitConfig(
        round=round_num,
        lr=c.lr,
        epochs=c.epochs,
        batch_size=c.batch_size,
        prox_mu=c.prox_mu,
        seed=shuffle_seed(seed, round_num, index),
    )


def client_payload(
    aggregator: Aggregator, client_id: Hashable, global_params: np.ndarray, res: FitRes
) -> Any:
    """Client side: the delta ``res.params - global`` (in float64) weighted by sample count,
    encoded for the aggregator. Raises ``UpdateRejected`` (from the aggregator) for a malformed
    update."""
    p = np.asarray(res.params)
    if p.dtype.kind != "f":
        p = p.astype(np.float64)
    delta = np.subtract(p, global_params, dtype=np.float64)  # float32 params: no float64 copy
    return aggregator.encode(client_id, delta, float(res.num_examples))


def server_step(
    algorithm: Algorithm,
    aggregator: Aggregator,
    aggregate: Aggregate,
    params: np.ndarray,
    opt_state: Any,
) -> tuple[np.ndarray, Any, float]:
    """Decode the aggregate (key holder) and apply the server optimizer.

    Returns (new params, new optimizer state, total weight). Raises ``RoundError`` when nothing
    usable arrived."""
    mean_delta, weight = aggregator.decode(aggregate)
    new_params, new_state = algorithm.server.apply(params, mean_delta, opt_state)
    return new_params, new_state, weight


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round (one row of the metrics history)."""

    round: int
    selected: int
    contributors: int
    total_weight: float
    train_loss: float | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)
    skipped: bool = False
    wall_s: float = 0.0
    upload_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = dict(self.metrics)
        d["rejected"] = {str(k): v for k, v in self.rejected.items()}
        return d
