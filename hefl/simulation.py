"""Simulate a federation on one machine.

Two entry points share one round loop:

- ``simulate(model, data, algorithm, ...)`` — TFF-style: a model adapter and a ``FederatedData``.
- ``run(clients, initial_params, algorithm, ...)`` — Flower-style: your own ``Client`` objects.

How client steps execute is a *runner* (``hefl.backends``: sequential, vectorized, Ray). Aggregation is an ``Aggregator`` (plain here, encrypted in
``hefl.crypto``). The algorithm code never changes with either.

Example:
    >>> import numpy as np
    >>> from hefl.algorithms import fedavg
    >>> class Mean:
    ...     def __init__(self, d): self.d = np.asarray(d, float)
    ...     def fit(self, params, config): return np.array([self.d.mean()]), len(self.d), {}
    ...     def evaluate(self, params, config): return 0.0, len(self.d), {}
    >>> res = run({0: Mean([1, 2]), 1: Mean([3, 4]), 2: Mean([5, 6])}, np.zeros(1), fedavg(),
    ...           rounds=1, clients_per_round=3)
    >>> float(res.params[0])
    3.5
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hefl.aggregation import Aggregator, PlainAggregator
from hefl.algorithms import Algorithm
from hefl.backends import ClientRunner, SequentialRunner, make_runner
from hefl.client import Client, EvaluateRes
from hefl.data.federated import ClientData, FederatedData
from hefl.errors import ClientError, ConfigError, HeflError, RoundError, UpdateRejected
from hefl.history import History
from hefl.rounds import RoundRecord, client_payload, fit_config, sample_clients, server_step


@dataclass(frozen=True)
class SimulationResult:
    """The trained global parameters (flat) and the per-round history."""

    params: np.ndarray
    history: History


def _weighted(values: Sequence[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else None


def run(
    clients: Mapping[Hashable, Client] | ClientRunner,
    initial_params: np.ndarray,
    algorithm: Algorithm,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    aggregator: Aggregator | None = None,
    evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
    client_eval_every: int = 0,
    progress: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds over ``clients``.

    Args:
        clients: client id -> Client, or a ClientRunner.
        initial_params: the initial global model as a flat vector.
        algorithm: e.g. ``fedavg()``, ``fedadam()``.
        rounds: number of rounds.
        clients_per_round: how many clients are sampled each round (all if >= the number).
        seed: drives client sampling and clients' local shuffling.
        aggregator: plain weighted mean by default; pass an encrypted one to hide updates.
        evaluate: central evaluation ``params -> {"loss": .., "accuracy": ..}`` each round
            (reported as ``test_loss``, ``test_accuracy``).
        client_eval_every: every k rounds, evaluate on every client's own test split
            (``client_loss``, ``client_accuracy``, weighted by examples); 0 = never.
        progress: show a rich progress bar.
        on_round: called with each round's record as it completes.
    """
    runner = (
        clients
        if hasattr(clients, "fit") and hasattr(clients, "ids")
        else SequentialRunner(clients)
    )  # type: ignore[arg-type]
    ids = list(runner.ids)
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds}")
    sample_clients(len(ids), clients_per_round, seed, 1)  # validates counts early
    params = np.asarray(initial_params, dtype=np.float64).copy()
    aggregator = aggregator or PlainAggregator(params.size)
    opt_state = algorithm.server.init(params)
    history = History()
    position = {cid: i for i, cid in enumerate(ids)}

    bar = _progress(progress, rounds)
    # Objects alive now (imports, data sets) live for the whole run: freezing them keeps full
    # collections from rescanning them every round (~130 ms each with torch + sklearn loaded).
    gc.freeze()
    try:
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            chosen = [ids[i] for i in sample_clients(len(ids), clients_per_round, seed, r)]
            configs = {cid: fit_config(algorithm, seed, r, position[cid]) for cid in chosen}
            results = runner.fit(chosen, params, configs)
            payloads: dict[Hashable, Any] = {}
            rejected: dict[Hashable, str] = {}
            losses: list[tuple[float, int]] = []
            upload = 0
            for cid in chosen:
                res = results.get(cid)
                if isinstance(res, Exception) or res is None:
                    rejected[cid] = _reason(res, cid)
                    continue
                if res.num_examples <= 0:
                    continue  # an empty client has nothing to contribute (weight 0)
                try:
                    payloads[cid] = client_payload(aggregator, cid, params, res)
                except UpdateRejected as e:
                    rejected[cid] = e.reason
                    continue
                upload += aggregator.nbytes(payloads[cid])
                if "loss" in res.metrics:
                    losses.append((float(res.metrics["loss"]), res.num_examples))
            agg = aggregator.aggregate(payloads)
            rejected.update(agg.rejected)
            skipped = False
            weight = 0.0
            try:
                params, opt_state, weight = server_step(
                    algorithm, aggregator, agg, params, opt_state
                )
            except RoundError:
                skipped = True  # nothing usable: keep the global model, record the round
            metrics: dict[str, float] = {}
            if evaluate is not None:
                metrics.update(
                    {f"test_{k}": float(v) for k, v in evaluate(params).items() if k != "n"}
                )
            if client_eval_every and r % client_eval_every == 0:
                metrics.update(_client_eval(runner, ids, params))
            record = RoundRecord(
                round=r,
                selected=len(chosen),
                contributors=agg.count,
                total_weight=weight,
                train_loss=_weighted(losses),
                metrics=metrics,
                rejected={str(k): v for k, v in rejected.items()},
                skipped=skipped,
                wall_s=time.perf_counter() - t0,
                upload_bytes=upload,
            )
            history.append(record)
            if on_round:
                on_round(record)
            if bar:
                bar[0].update(bar[1], advance=1, description=_describe(record))
    finally:
        gc.unfreeze()
        if bar:
            bar[0].stop()
    return SimulationResult(params, history)


def _reason(res: object, cid: Hashable) -> str:
    if res is None:
        return "no result returned"
    if isinstance(res, ClientError):
        return res.reason
    if isinstance(res, HeflError):
        return str(res)
    return f"fit raised {type(res).__name__}: {res}"


def _client_eval(runner: Any, ids: list[Hashable], params: np.ndarray) -> dict[str, float]:
    res = [r for r in runner.evaluate(ids, params).values() if isinstance(r, EvaluateRes)]
    loss = _weighted([(r.loss, r.num_examples) for r in res])
    acc = _weighted([(r.metrics.get("accuracy", 0.0), r.num_examples) for r in res])
    out = {}
    if loss is not None:
        out["client_loss"] = loss
    if acc is not None:
        out["client_accuracy"] = acc
    return out


def _describe(record: RoundRecord) -> str:
    acc = record.metrics.get("test_accuracy", record.metrics.get("client_accuracy"))
    s = f"round {record.round}: {record.contributors}/{record.selected} clients"
    return s + (f", accuracy {acc:.3f}" if acc is not None else "")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )
    p.start()
    return p, p.add_task("starting", total=total)


def simulate(
    model: Any,
    data: FederatedData,
    algorithm: Algorithm,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    test: ClientData | tuple[np.ndarray, np.ndarray] | None = None,
    aggregator: Aggregator | None = None,
    backend: str = "sequential",
    client_eval_every: int = 0,
    progress: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    initial_params: np.ndarray | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Federated training of ``model`` over ``data`` (TFF-style).

    Args:
        model: a model adapter (``TorchModel``, ``LogisticRegressionModel``).
        data: client id -> client data (and optionally the clients' own test splits).
        test: a central test set, evaluated every round.
        backend: how client steps run: ``"sequential"`` (default), ``"vectorized"``, ``"ray"``.
        backend_options: passed to ``make_runner`` (e.g. ``{"device": "cuda"}``).
        Other arguments: as ``run``.
    """
    if len(data) == 0:
        raise ConfigError("the federated data set has no clients")
    runner = make_runner(model, data, backend, **dict(backend_options or {}))
    evaluate = None
    if test is not None:
        test_data = test if isinstance(test, ClientData) else ClientData(*test)
        evaluate = lambda p: model.evaluate(p, test_data)  # noqa: E731
    init = model.init_vector() if initial_params is None else initial_params
    try:
        return run(
            runner,
            init,
            algorithm,
            rounds=rounds,
            clients_per_round=clients_per_round,
            seed=seed,
            aggregator=aggregator,
            evaluate=evaluate,
            client_eval_every=client_eval_every,
            progress=progress,
            on_round=on_round,
        )
    finally:
        close = getattr(runner, "close", None)
        if callable(close):
            close()
