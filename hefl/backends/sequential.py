"""The runner seam and the in-process sequential runner.

A *runner* executes client steps for a set of clients; the round loop (``hefl.simulation.run``)
does not know whether they run one after another here, as one batched computation
(``hefl.backends.vectorized``) or on Ray actors (``hefl.backends.ray``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
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


def fit_each(runner: ClientRunner, ids: Sequence[Hashable], params: np.ndarray,
             configs: Mapping[Hashable, FitConfig],
             on_result: Callable[[Hashable, FitRes | Exception | None], None]) -> None:
    """``runner.fit``, then ``on_result(id, result)`` for each id in ``ids``' order: as each
    client finishes where the runner supports it (``SequentialRunner``), else after all (a
    missing result is None)."""
    import inspect

    if "on_result" in inspect.signature(runner.fit).parameters:
        runner.fit(ids, params, configs, on_result=on_result)  # type: ignore[call-arg]
        return
    results = runner.fit(ids, params, configs)
    for cid in ids:
        on_result(cid, results.get(cid))


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
        self, ids: Sequence[Hashable], params: np.ndarray, configs: Mapping[Hashable, FitConfig],
        on_result: Callable[[Hashable, FitRes | Exception], None] | None = None,
    ) -> dict[Hashable, FitRes | Exception]:
        """Each client's fit in turn; ``on_result(id, result)`` as soon as each is done (so the
        round can encode and encrypt one client's update while the next trains)."""
        out: dict[Hashable, FitRes | Exception] = {}
        for cid in ids:
            try:
                out[cid] = as_fit_res(self.clients[cid].fit(params, configs[cid]), cid)
            except Exception as e:  # noqa: BLE001 - one client's failure must not stop the round
                out[cid] = e
            if on_result is not None:
                on_result(cid, out[cid])
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
