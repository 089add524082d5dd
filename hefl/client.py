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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hefl.data.federated import ClientData
from hefl.errors import ClientError

#: Flower's names for the same settings (``config["local_epochs"]`` works as in a Flower client).
FLOWER_KEYS: dict[str, str] = {
    "server_round": "round",
    "learning_rate": "lr",
    "local_epochs": "epochs",
    "proximal_mu": "prox_mu",
}


@dataclass(frozen=True)
class FitConfig(Mapping[str, Any]):
    """What the server sends a client with the global parameters each round.

    Typed attributes (``config.lr``) and, for Flower-style clients, a read-only mapping:
    ``config["lr"]``, ``config.get("batch_size", 32)``, ``dict(config)``; Flower's key names
    (``FLOWER_KEYS``: ``server_round``, ``learning_rate``, ``local_epochs``, ``proximal_mu``) are
    accepted too.

    Example:
        >>> c = FitConfig(round=3, lr=0.1, epochs=2, batch_size=16)
        >>> c["lr"], c["local_epochs"], c.get("momentum", 0.0), "server_round" in c
        (0.1, 2, 0.0, True)
    """

    round: int
    lr: float
    epochs: int
    batch_size: int
    prox_mu: float = 0.0
    seed: int = 0

    def __getitem__(self, key: str) -> Any:
        name = FLOWER_KEYS.get(key, key)
        if name not in _FIT_FIELDS:
            raise KeyError(
                f"{key!r} is not in the fit config; it holds {', '.join(_FIT_FIELDS)} "
                f"(Flower names: {', '.join(FLOWER_KEYS)})"
            )
        return getattr(self, name)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and FLOWER_KEYS.get(key, key) in _FIT_FIELDS

    def __iter__(self) -> Iterator[str]:
        return iter(_FIT_FIELDS)

    def __len__(self) -> int:
        return len(_FIT_FIELDS)


_FIT_FIELDS = tuple(f.name for f in fields(FitConfig))


@dataclass(frozen=True)
class FitRes:
    """A client's answer to fit: its new parameters (flat), sample count and metrics."""

    params: np.ndarray
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateRes:
    """A client's answer to evaluate: its loss, sample count and metrics."""

    loss: float
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Client(Protocol):
    """A Flower-style client: ``fit`` returns a ``FitRes`` or ``(params, num_examples,
    metrics)``, ``evaluate`` an ``EvaluateRes`` or ``(loss, num_examples, metrics)``; ``params``
    is the flat global parameter vector."""

    def fit(self, params: np.ndarray, config: FitConfig) -> Any: ...

    def evaluate(self, params: np.ndarray, config: Mapping[str, Any]) -> Any: ...


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

    def evaluate(self, params: np.ndarray, config: Mapping[str, Any] | None = None) -> EvaluateRes:
        data = self.test if self.test is not None else self.train
        if len(data) == 0:
            return EvaluateRes(0.0, 0, {})
        m = self.model.evaluate(params, data)
        return EvaluateRes(m["loss"], len(data), {"accuracy": m["accuracy"]})
