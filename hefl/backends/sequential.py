"""The runner seam and the in-process sequential runner.

A *runner* executes client steps for a set of clients; the round loop (``hefl.simulation.run``)
does not know whether they run one after another here, as one batched computation
(``hefl.backends.vectorized``) or on Ray actors (``hefl.backends.ray``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from hefl.client import (
    Client,
    EvaluateRes,
    FitConfig,
    FitRes,
    ModelClient,
    as_evaluate_res,
    as_fit_res,
)
from hefl.data.federated import FederatedData


class ClientRunner(Protocol):
    """Executes client steps for a set of clients (in-process, vectorized, Ray, ...).

    A client that fails is reported as the exception in its slot, never raised."""

    ids: Sequence[Hashable]

    def fit(
        self, ids: Sequence[Hashable], params: np.ndarray, configs: Mapping[Hashable, FitConfig]
    ) -> Mapping[Hashable, FitRes | Exception]: ...

    def evaluate(
        self, ids: Sequence[Hashable], params: np.ndarray
    ) -> Mapping[Hashable, EvaluateRes | Exception]: ...


class SequentialRunner:
    """Runs each client's fit in turn, in this process. A client that raises is reported, not
    fatal."""

    def __init__(self, clients: Mapping[Hashable, Client]) -> None:
        self.clients = dict(clients)
        self.ids: list[Hashable] = list(self.clients)

    @classmethod
    def over(cls, model: Any, data: FederatedData) -> SequentialRunner:
        """One ``ModelClient`` per client of ``data`` (its training data and test split)."""
        return cls({cid: ModelClient(model, d, data.test.get(cid)) for cid, d in data.train.items()})

    def fit(
        self, ids: Sequence[Hashable], params: np.ndarray, configs: Mapping[Hashable, FitConfig]
    ) -> dict[Hashable, FitRes | Exception]:
        out: dict[Hashable, FitRes | Exception] = {}
        for cid in ids:
            try:
                out[cid] = as_fit_res(self.clients[cid].fit(params, configs[cid]), cid)
            except Exception as e:  # noqa: BLE001 - one client's failure must not stop the round
                out[cid] = e
        return out

    def evaluate(
        self, ids: Sequence[Hashable], params: np.ndarray
    ) -> dict[Hashable, EvaluateRes | Exception]:
        out: dict[Hashable, EvaluateRes | Exception] = {}
        for cid in ids:
            try:
                out[cid] = as_evaluate_res(self.clients[cid].evaluate(params, {}), cid)
            except Exception as e:  # noqa: BLE001 - one client's failure must not stop the round
                out[cid] = e
        return out
