"""Client runners: how a round's client steps execute, chosen per run.

- ``sequential``: one client after another in this process (``hefl.backends.sequential``).
- ``vectorized``: the local training of a whole cohort as one batched computation
  (``torch.func.vmap`` over stacked client parameters), on CPU or CUDA.
- ``ray``: client steps as Ray actor calls, for more than one machine.

Arrows point one way: ``hefl.simulation`` imports this package; runners import nothing above
them. The vectorized and Ray runners import torch or ray only when one is built.
"""

from __future__ import annotations

from typing import Any

from hefl.backends.sequential import ClientRunner, SequentialRunner
from hefl.data.federated import FederatedData
from hefl.errors import ConfigError

BACKENDS = ("sequential", "vectorized", "ray")


def make_runner(model: Any, data: FederatedData, backend: str = "sequential", **options: Any) -> Any:
    """The ClientRunner for ``backend`` over ``data`` (each client its own data and test split).

    Options: ``"vectorized"`` takes ``device`` ("cpu"/"cuda") and ``max_cohort``
    (``hefl.backends.vectorized``); ``"ray"`` takes ``address``, ``num_cpus``, ``num_actors``,
    ``threads`` (``hefl.backends.ray``, needs the ``ray`` extra).

    Example:
        >>> import numpy as np
        >>> from hefl.data import FederatedData
        >>> from hefl.models import LogisticRegressionModel
        >>> data = FederatedData.from_indices(np.ones((4, 2)), np.array([0, 1, 0, 1]), [[0, 1], [2, 3]])
        >>> make_runner(LogisticRegressionModel(2, 2), data).ids
        [0, 1]
    """
    if backend == "sequential":
        return SequentialRunner.over(model, data)
    if backend == "vectorized":
        from hefl.backends.vectorized import vectorized_runner

        return vectorized_runner(model, data, **options)
    if backend == "ray":
        from hefl.backends.ray import RayRunner

        return RayRunner(model, data, **options)
    raise ConfigError(
        f"unknown or unavailable backend {backend!r}; choose one of: {', '.join(BACKENDS)}"
    )


__all__ = ["BACKENDS", "ClientRunner", "SequentialRunner", "make_runner"]
