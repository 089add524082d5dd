"""Federated algorithms as explicit-state (init, apply) pairs.

A federated algorithm is a client configuration (how each client trains locally) plus a server
optimizer that turns the averaged client delta into the next global model. Server optimizers follow
optax's shape: a NamedTuple of two pure functions, state in, state out, no hidden mutation.

    state = opt.init(params)
    params, state = opt.apply(params, mean_delta, state)

``mean_delta`` is the weighted mean of ``client_params - global_params`` (a pseudo-gradient with
the sign of a step). Because optimizers only ever see the *decrypted average*, every optimizer here
works unchanged with encrypted aggregation.

References:
    FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
        Data", AISTATS 2017.
    FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
    FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution", 2019.
    FedAdam / FedYogi / FedAdagrad: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

Example:
    >>> import numpy as np
    >>> algo = fedadam(client_lr=0.05, server_lr=0.01)
    >>> state = algo.server.init(np.zeros(3))
    >>> new, state = algo.server.apply(np.zeros(3), np.ones(3), state)
    >>> new.shape
    (3,)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from hefl.errors import ConfigError


class ServerOptimizer(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and
    ``apply(params, mean_delta, state) -> (new_params, new_state)``."""

    init: Callable[[np.ndarray], Any]
    apply: Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


@dataclass(frozen=True)
class ClientConfig:
    """How each client trains locally.

    Attributes:
        lr: client SGD learning rate.
        epochs: local epochs per round.
        batch_size: minibatch size (the last partial batch is kept).
        prox_mu: FedProx proximal coefficient; 0 is plain FedAvg local training.
    """

    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 32
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        _positive("client lr", self.lr)
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prox_mu < 0:
            raise ConfigError(f"prox_mu must be >= 0, got {self.prox_mu}")


@dataclass(frozen=True)
class Algorithm:
    """A named federated algorithm: client training config plus server optimizer."""

    name: str
    client: ClientConfig
    server: ServerOptimizer


def _positive(what: str, value: float) -> None:
    if not (value > 0 and np.isfinite(value)):
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")


# ---------------------------------------------------------------- server optimizers


def server_sgd(lr: float = 1.0) -> ServerOptimizer:
    """``params + lr * mean_delta``; lr=1 is FedAvg's plain averaging."""
    _positive("server lr", lr)
    return ServerOptimizer(
        init=lambda params: (),
        apply=lambda params, delta, state: (params + lr * delta, state),
    )


def server_momentum(lr: float = 1.0, momentum: float = 0.9) -> ServerOptimizer:
    """FedAvgM: heavy-ball momentum on the averaged delta."""
    _positive("server lr", lr)

    def apply(params: np.ndarray, delta: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, Any]:
        m = momentum * m + delta
        return params + lr * m, m

    return ServerOptimizer(init=np.zeros_like, apply=apply)


def _adaptive(
    second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray],
    lr: float,
    beta1: float,
    tau: float,
) -> ServerOptimizer:
    _positive("server lr", lr)
    _positive("tau", tau)

    def init(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros_like(params), np.full_like(params, tau * tau)

    def apply(params: np.ndarray, delta: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        m, v = state
        m = beta1 * m + (1.0 - beta1) * delta
        v = second_moment(v, delta * delta)
        return params + lr * m / (np.sqrt(v) + tau), (m, v)

    return ServerOptimizer(init=init, apply=apply)


def server_adam(
    lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """FedAdam (Reddi et al. 2021, Algorithm 2)."""
    return _adaptive(lambda v, d2: beta2 * v + (1.0 - beta2) * d2, lr, beta1, tau)


def server_yogi(
    lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """FedYogi (Reddi et al. 2021): additive second-moment update."""
    return _adaptive(lambda v, d2: v - (1.0 - beta2) * d2 * np.sign(v - d2), lr, beta1, tau)


def server_adagrad(lr: float = 0.01, tau: float = 1e-3) -> ServerOptimizer:
    """FedAdagrad (Reddi et al. 2021): no first-moment decay, accumulated second moment."""
    return _adaptive(lambda v, d2: v + d2, lr, 0.0, tau)


# ---------------------------------------------------------------- algorithm builders


def fedavg(client_lr: float = 0.05, epochs: int = 1, batch_size: int = 32) -> Algorithm:
    """FedAvg (McMahan et al. 2017): weighted mean of client models.

    Example:
        >>> fedavg(client_lr=0.1).client.lr
        0.1
    """
    return Algorithm("fedavg", ClientConfig(client_lr, epochs, batch_size), server_sgd(1.0))


def fedprox(
    mu: float = 0.01, client_lr: float = 0.05, epochs: int = 1, batch_size: int = 32
) -> Algorithm:
    """FedProx (Li et al. 2020): FedAvg whose clients add ``mu/2 ||w - w_global||^2``."""
    return Algorithm(
        "fedprox", ClientConfig(client_lr, epochs, batch_size, prox_mu=mu), server_sgd(1.0)
    )


def fedavgm(
    client_lr: float = 0.05,
    server_lr: float = 1.0,
    momentum: float = 0.9,
    epochs: int = 1,
    batch_size: int = 32,
) -> Algorithm:
    """FedAvgM (Hsu et al. 2019): server momentum on the averaged delta."""
    return Algorithm(
        "fedavgm", ClientConfig(client_lr, epochs, batch_size), server_momentum(server_lr, momentum)
    )


def fedadam(
    client_lr: float = 0.05,
    server_lr: float = 0.01,
    epochs: int = 1,
    batch_size: int = 32,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> Algorithm:
    """FedAdam (Reddi et al. 2021)."""
    return Algorithm(
        "fedadam",
        ClientConfig(client_lr, epochs, batch_size),
        server_adam(server_lr, beta1, beta2, tau),
    )


def fedyogi(
    client_lr: float = 0.05,
    server_lr: float = 0.01,
    epochs: int = 1,
    batch_size: int = 32,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> Algorithm:
    """FedYogi (Reddi et al. 2021)."""
    return Algorithm(
        "fedyogi",
        ClientConfig(client_lr, epochs, batch_size),
        server_yogi(server_lr, beta1, beta2, tau),
    )


def fedadagrad(
    client_lr: float = 0.05,
    server_lr: float = 0.01,
    epochs: int = 1,
    batch_size: int = 32,
    tau: float = 1e-3,
) -> Algorithm:
    """FedAdagrad (Reddi et al. 2021)."""
    return Algorithm(
        "fedadagrad", ClientConfig(client_lr, epochs, batch_size), server_adagrad(server_lr, tau)
    )


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
}


def make_algorithm(name: str, **kwargs: Any) -> Algorithm:
    """Build an algorithm by name, passing only the keyword arguments it accepts (None = default).

    Raises:
        ConfigError: the name is unknown.
    """
    import inspect

    key = name.lower()
    if key not in ALGORITHMS:
        raise ConfigError(
            f"unknown algorithm {name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}"
        )
    builder = ALGORITHMS[key]
    accepted = inspect.signature(builder).parameters
    return builder(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})
