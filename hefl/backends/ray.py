"""Ray backend: client steps as calls on Ray actors, for when one machine is not enough.

Each actor holds the model and the federated data once (put in Ray's object store when the
runner is built; numpy arrays are shared zero-copy by the workers of one node) and runs a
``SequentialRunner`` over them. Each round the global parameters are put in the object store
once, the sampled clients are split into one contiguous share per actor, and every actor trains
its share in one call; results come back as ``FitRes`` (or the client's exception, reported like
the sequential backend does). The results are those of the sequential backend: same data, same
seeds, same code, only the process differs.

Ray is an optional dependency (``pip install 'hefl[ray]'``); it is imported when a runner is
built. Ray serialises the model and data with its own (pickle-based) object store between
trusted processes of one cluster; nothing here is a network protocol for untrusted parties (that
is ``hefl.net``).

Example (needs Ray; starts a local instance if none is running):
    >>> from hefl import fedavg, run  # doctest: +SKIP
    >>> from hefl.backends import make_runner  # doctest: +SKIP
    >>> runner = make_runner(model, data, "ray", num_cpus=2)  # doctest: +SKIP
    >>> result = run(runner, model.init_vector(), fedavg(), rounds=5, clients_per_round=10)
    ... # doctest: +SKIP
    >>> runner.close()  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from hefl.client import EvaluateRes, FitConfig, FitRes
from hefl.data.federated import FederatedData
from hefl.errors import ClientError, ConfigError


class ClientWorker:
    """What one Ray actor runs: a sequential runner over the whole federation's data."""

    def __init__(self, model: Any, data: FederatedData, threads: int = 1) -> None:
        if "torch" in sys.modules or hasattr(model, "module"):
            import torch

            torch.set_num_threads(threads)
        from hefl.backends.sequential import SequentialRunner

        self.runner = SequentialRunner.over(model, data)

    def fit(self, ids, params, configs):
        return self.runner.fit(ids, params, configs)

    def evaluate(self, ids, params):
        return self.runner.evaluate(ids, params)


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            "the 'ray' backend needs Ray, which is not installed: pip install 'hefl[ray]' "
            "(or choose backend 'sequential' or 'vectorized')"
        ) from e
    return ray


class RayRunner:
    """Runs client steps on Ray actors (see the module docstring).

    Args:
        model: the model adapter (sent once to every actor).
        data: the federation's data (put once in the object store).
        address: a running Ray cluster to join (``"auto"``, ``"ray://host:10001"``); default:
            the instance this process already started, else a new local one.
        num_cpus: CPUs of a new local instance (ignored when joining a cluster).
        num_actors: how many actors train clients; default: one per CPU of the cluster.
        threads: torch intra-op threads in each actor.

    Raises:
        ConfigError: Ray is not installed, or an option is invalid.
    """

    def __init__(
        self,
        model: Any,
        data: FederatedData,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        num_actors: int | None = None,
        threads: int = 1,
    ) -> None:
        ray = _import_ray()
        if num_actors is not None and num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {num_actors}")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(
                address=address,
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started = True
        self.ids = list(data.ids)
        n = num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(n, max(1, len(self.ids)))
        model_ref, data_ref = ray.put(model), ray.put(data)
        actor = ray.remote(num_cpus=1)(ClientWorker)
        self.actors = [actor.remote(model_ref, data_ref, threads) for _ in range(n)]

    def _spread(self, method: str, ids: Sequence[Hashable], *args: Any) -> dict[Hashable, Any]:
        ray = self._ray
        ids = list(ids)
        share = -(-len(ids) // len(self.actors)) if ids else 1
        calls = []
        for i, actor in enumerate(self.actors):
            part = ids[i * share : (i + 1) * share]
            if part:
                calls.append((part, getattr(actor, method).remote(part, *args)))
        out: dict[Hashable, Any] = {}
        for part, ref in calls:
            try:
                out.update(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - a lost actor fails its clients, not the run
                for cid in part:
                    out[cid] = ClientError(
                        f"Ray actor failed: {type(e).__name__}: {e}", client_id=cid, stage=method
                    )
        return {cid: out[cid] for cid in ids}

    def fit(
        self, ids: Sequence[Hashable], params: np.ndarray, configs: Mapping[Hashable, FitConfig]
    ) -> dict[Hashable, FitRes | Exception]:
        ref = self._ray.put(np.asarray(params, dtype=np.float64))
        return self._spread("fit", ids, ref, {cid: configs[cid] for cid in ids})

    def evaluate(
        self, ids: Sequence[Hashable], params: np.ndarray
    ) -> dict[Hashable, EvaluateRes | Exception]:
        return self._spread("evaluate", ids, self._ray.put(np.asarray(params, dtype=np.float64)))

    def close(self) -> None:
        """End the actors (and the local Ray instance, if this runner started it)."""
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
