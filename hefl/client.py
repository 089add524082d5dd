"""The client interface (Flower-style) and the client that trains a model on local data.

A client is anything with ``fit(params, config)`` and ``evaluate(params, config)``. ``fit`` may
return a ``FitRes`` or Flower's familiar tuple ``(params, num_examples, metrics)``.

Example (a Flower-style client written by a user):
    >>> import numpy as np
    >>> class MeanClient:
    ...     def __init__(self, data): self.data = np.asarray(data, float)
    ...     def fit(self, params, config):
    ...         return np.array([self.data.mean()]), len(self.data), {}
    ...     def evaluate(self, params, config):
    ...         return float(((self.data - params[0]) ** 2).mean()), len(self.data), {}
    >>> as_fit_res(MeanClient([1, 2]).fit(np.zeros(1), None)).num_examples
    2
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hefl.data.federated import ClientData
from hefl.errors import ClientError


@dataclass(frozen=True)
class FitConfig:
    """What the server sends a client with the global parameters each round."""

    round: int
    lr: float
    epochs: int
    batch_size: int
    prox_mu: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class FitRes:
    """A client's answer to fit: its new parameters (flat), sample count and metrics."""

    params: np.ndarray
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateRes:
    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Client(Protocol):
    def fit(self, params: np.ndarray, config: FitConfig) -> Any: ...

    def evaluate(self, params: np.ndarray, config: FitConfig) -> Any: ...


def as_fit_res(out: Any, client_id: object = None) -> FitRes:
    """Normalise a FitRes or Flower-style ``(params, num_examples, metrics)`` tuple."""
    if isinstance(out, FitRes):
        return out
    try:
        params, n, metrics = out
        return FitRes(np.asarray(params, dtype=np.float64), int(n), dict(metrics or {}))
    except (TypeError, ValueError) as e:
        raise ClientError(
            "fit must return FitRes or (params, num_examples, metrics)",
            client_id=client_id,
            stage="fit",
        ) from e


def as_evaluate_res(out: Any, client_id: object = None) -> EvaluateRes:
    if isinstance(out, EvaluateRes):
        return out
    try:
        loss, n, metrics = out
        return EvaluateRes(float(loss), int(n), dict(metrics or {}))
    except (TypeError, ValueError) as e:
        raise ClientError(
            "evaluate must return EvaluateRes or (loss, num_examples, metrics)",
            client_id=client_id,
            stage="evaluate",
        ) from e


class ModelClient:
    """A client that trains a model adapter on its own data (the TFF-style path)."""

    def __init__(self, model: Any, train: ClientData, test: ClientData | None = None) -> None:
        self.model = model
        self.train = train
        self.test = test

    def fit(self, params: np.ndarray, config: FitConfig) -> FitRes:
        if len(self.train) == 0:
            return FitRes(params, 0, {})
        new, metrics = self.model.fit(params, self.train, config)
        return FitRes(new, len(self.train), metrics)

    def evaluate(self, params: np.ndarray, config: FitConfig) -> EvaluateRes:
        data = self.test if self.test is not None else self.train
        if len(data) == 0:
            return EvaluateRes(0.0, 0, {})
        m = self.model.evaluate(params, data)
        return EvaluateRes(m["loss"], len(data), {"accuracy": m["accuracy"]})
