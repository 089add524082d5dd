"""Named workloads: everything a run needs (model, federated data, test set, algorithm).

W1 reproduces ``../shared/bench/WORKLOADS.md`` exactly: digits split 80/20 (seed 0), scaled,
Dirichlet(0.5) label split, MLP 64-128-10 initialised after ``torch.manual_seed(0)``, SGD lr 0.05,
batch 32, one local epoch, FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hefl.data.federated import ClientData, FederatedData
from hefl.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    """A ready-to-run federated task."""

    name: str
    model: Any
    data: FederatedData
    test: ClientData | None
    client_lr: float
    batch_size: int
    rounds: int
    clients_per_round: int


W1_CONFIGS = {"a": (10, 10, 20), "b": (100, 10, 30), "c": (1000, 50, 10)}


def digits(
    num_clients: int = 100,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    rounds: int = 20,
    clients_per_round: int = 10,
    client_lr: float = 0.05,
    batch_size: int = 32,
) -> Workload:
    """scikit-learn digits with the W1 split, model and local training."""
    from hefl.data.loaders import load_digits
    from hefl.data.partition import dirichlet, iid
    from hefl.models.torch import TorchModel
    from hefl.models.zoo import mlp

    d = load_digits(seed)
    if partition == "dirichlet":
        parts = dirichlet(d.y_train, num_clients, alpha, seed)
    elif partition == "iid":
        parts = iid(len(d.y_train), num_clients, seed)
    else:
        raise ConfigError(f"unknown partition {partition!r}; choose 'dirichlet' or 'iid'")
    return Workload(
        name="digits",
        model=TorchModel(mlp, seed=seed),
        data=FederatedData.from_indices(d.x_train, d.y_train, parts),
        test=ClientData(d.x_test, d.y_test),
        client_lr=client_lr,
        batch_size=batch_size,
        rounds=rounds,
        clients_per_round=clients_per_round,
    )


def w1(config: str) -> Workload:
    """Workload W1 config ``a``, ``b`` or ``c``."""
    if config not in W1_CONFIGS:
        raise ConfigError(f"unknown W1 config {config!r}; choose one of a, b, c")
    n, k, r = W1_CONFIGS[config]
    return digits(num_clients=n, rounds=r, clients_per_round=k)


def seed_everything_for_torch(threads: int = 1) -> None:
    """W1 runs torch with one intra-op thread."""
    import torch

    torch.set_num_threads(threads)


def summary(result: Any) -> dict[str, Any]:
    """Final metrics of a SimulationResult as plain numbers."""
    final = result.history.records[-1] if len(result.history) else None
    return {
        "rounds": len(result.history),
        "final_accuracy": None if final is None else final.metrics.get("test_accuracy"),
        "final_loss": None if final is None else final.metrics.get("test_loss"),
        "mean_upload_bytes": float(np.mean([r.upload_bytes for r in result.history]))
        if len(result.history)
        else 0.0,
    }
