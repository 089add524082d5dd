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
import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from hefl.aggregation import Aggregator, PlainAggregator
from hefl.algorithms import Algorithm
from hefl.backends import ClientRunner, SequentialRunner, make_runner
from hefl.backends.sequential import fit_each
from hefl.client import Client, EvaluateRes
from hefl.data.federated import ClientData, FederatedData
from hefl.errors import ConfigError, NothingTrained, UpdateRejected
from hefl.history import History
from hefl.privacy import DpConfig, DpPlan
from hefl.privacy.plan import quant_step
from hefl.privacy.roles import DpEncoder
from hefl.roles import Scheme, as_scheme
from hefl.rounds import (
    Answer,
    Contribution,
    RoundRecord,
    accept,
    client_answer,
    finish_round,
    nothing_trained,
    plan_round,
    sample_clients,
    weighted_mean,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationResult:
    """The trained global parameters (flat) and the per-round history.

    Attributes:
        privacy: the DP plan the run followed (None without DP); ``privacy.to_json(rounds)``
            says what was spent.
        stopped: why the run ended before its last round (the privacy budget), else "".
    """

    params: np.ndarray
    history: History
    privacy: DpPlan | None = None
    stopped: str = ""


def run(
    clients: Mapping[Hashable, Client] | ClientRunner,
    initial_params: np.ndarray,
    algorithm: Algorithm,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    aggregator: Aggregator | Scheme | None = None,
    evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
    client_eval_every: int = 0,
    progress: bool | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    privacy: DpConfig | DpPlan | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds over ``clients``.

    Args:
        clients: client id -> Client, or a ClientRunner.
        initial_params: the initial global model as a flat vector.
        algorithm: e.g. ``fedavg()``, ``fedadam()``.
        rounds: number of rounds.
        clients_per_round: how many clients are sampled each round (all if >= the number).
        seed: drives client sampling and clients' local shuffling.
        aggregator: plain weighted mean by default; pass an encrypted one to hide updates
            (``hefl.crypto.make_aggregator``) or any ``hefl.roles.Scheme``.
        evaluate: central evaluation ``params -> {"loss": .., "accuracy": ..}`` each round
            (reported as ``test_loss``, ``test_accuracy``).
        client_eval_every: every k rounds, evaluate on every client's own test split
            (``client_loss``, ``client_accuracy``, weighted by examples); 0 = never.
        progress: show a rich progress bar (default: when the output is a terminal or a
            notebook).
        on_round: called with each round's record as it completes.
        privacy: client-level DP (``hefl.dp(...)``): clients are Poisson-sampled, updates
            clipped and weighted equally, noise added (``hefl.privacy``); each record carries
            ``dp_epsilon``, and the run stops before a round that would exceed the budget.
            Distributed DP needs a BFV aggregator built with the plan's options
            (``make_aggregator("bfv", size, **plan.aggregator_options())``).

    Raises:
        NothingTrained: every round was skipped (every client failed, or nothing could be
            decoded); its ``result`` holds the history with each round's reasons.
    """
    runner: ClientRunner = (
        clients  # type: ignore[assignment]
        if hasattr(clients, "fit") and hasattr(clients, "ids")
        else SequentialRunner(clients)  # type: ignore[arg-type]
    )
    ids = list(runner.ids)
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds}")
    sample_clients(len(ids), clients_per_round, seed, 1)  # validates counts early
    params = np.asarray(initial_params, dtype=np.float64).copy()
    scheme = as_scheme(aggregator or PlainAggregator(params.size))
    decoder = scheme.decoder
    if decoder is None:
        raise ConfigError(f"scheme {scheme.name!r} has no decoder in this process; simulation "
                          "needs all three roles (use hefl.crypto.make_aggregator)")
    plan = _dp_plan(privacy, aggregator, scheme, len(ids), clients_per_round, rounds,
                    params.size)
    rate = None
    if plan is not None:
        scheme = _privatize(scheme, plan, aggregator, seed)
        decoder = scheme.decoder
        assert decoder is not None
        rate = plan.sampling_rate
    opt_state = algorithm.server.init(params)
    history = History()
    stopped = ""

    def metrics(r: int) -> Callable[[np.ndarray], dict[str, float]]:
        def of(p: np.ndarray) -> dict[str, float]:
            m: dict[str, float] = {}
            if evaluate is not None:
                m.update({f"test_{k}": float(v) for k, v in evaluate(p).items() if k != "n"})
            if client_eval_every and r % client_eval_every == 0:
                m.update(_client_eval(runner, ids, p))
            return m

        return of

    bar = _progress(progress, rounds)
    # Objects alive now (imports, data sets) live for the whole run: freezing them keeps full
    # collections from rescanning them every round (~130 ms each with torch + sklearn loaded).
    gc.freeze()
    try:
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            spent = plan.epsilon(r) if plan is not None else None
            if plan is not None and (why := plan.over_budget(r)):
                stopped = why
                break
            rp = plan_round(ids, clients_per_round, seed, algorithm, r, rate)
            if isinstance(scheme.encoder, DpEncoder):  # distributed DP: noise for this count
                scheme.encoder.begin_round(len(rp.chosen))
            answers, encode_s = _answers(runner, scheme, rp.chosen, rp.configs, params)
            contributions: dict[Hashable, Contribution] = {}
            rejected: dict[Hashable, str] = {}
            for cid in rp.chosen:
                try:
                    contributions[cid] = accept(scheme.summer, cid, answers[cid])
                except UpdateRejected as e:
                    rejected[cid] = e.reason
            params, opt_state, record = finish_round(
                rp, contributions, rejected, summer=scheme.summer, decoder=decoder,
                algorithm=algorithm, params=params, opt_state=opt_state, evaluate=metrics(r),
                started=t0, encode_s=encode_s,
            )
            if spent is not None:
                record = replace(record, dp_epsilon=spent)
            history.append(record)
            if on_round:
                on_round(record)
            if bar:
                bar[0].update(bar[1], advance=1, description=_describe(record))
    finally:
        gc.unfreeze()
        if bar:
            bar[0].stop()
    result = SimulationResult(params, history, plan, stopped)
    if stopped:
        log.warning(stopped)
    reason = nothing_trained(history.records)
    if reason is not None:
        raise NothingTrained(reason, result)
    return result


def _answers(runner: ClientRunner, scheme: Scheme, chosen: Sequence[Hashable],
             configs: Mapping[Hashable, Any], params: np.ndarray
             ) -> tuple[dict[Hashable, Answer], float]:
    """The chosen clients' answers, each encoded as soon as its fit is done (so a pooled
    encoder encrypts one client's update while the next trains), and the encoding time: the
    encoders' calls plus the wait for what the pool had not encrypted when the last fit ended."""
    answers: dict[Hashable, Answer] = {}
    spent = [0.0]

    def answer(cid: Hashable, outcome: object) -> None:
        t0 = time.perf_counter()
        answers[cid] = client_answer(scheme.encoder, cid, params, outcome)
        spent[0] += time.perf_counter() - t0

    try:
        fit_each(runner, list(chosen), params, configs, answer)
        t0 = time.perf_counter()
        flush = getattr(scheme.encoder, "flush", None)
        if flush is not None:
            flush()
    except BaseException:  # an interrupted round leaves nothing queued for the next one
        abandon = getattr(scheme.encoder, "abandon", None)
        if abandon is not None:
            abandon()
        raise
    return answers, spent[0] + time.perf_counter() - t0


def _dp_plan(privacy: DpConfig | DpPlan | None, aggregator: Any, scheme: Scheme,
             num_clients: int, per_round: int, rounds: int, size: int) -> DpPlan | None:
    """The run's DP plan, after checking that the scheme can carry it.

    Raises:
        ConfigError: the custody lets someone see the un-noised sum (central DP with clients
            or a threshold committee holding the key), or distributed DP without a BFV
            aggregator built with the plan's noise.
    """
    if privacy is None:
        return None
    spec = getattr(aggregator, "spec", None)
    custody = getattr(aggregator, "custody", None)
    bits = spec.bits if spec is not None and spec.scheme == "bfv" else 16
    plan = (privacy if isinstance(privacy, DpPlan)
            else privacy.plan(num_clients, per_round, rounds, size, bits))
    if plan.mode == "central" and custody in ("clients", "threshold"):
        raise ConfigError(
            f"central DP adds noise where the sum is first decrypted, but in custody {custody!r} "
            "that party is " + ("every client" if custody == "clients" else "whoever fuses the "
            "partial decryptions") + "; use custody 'keyholder', or mode 'distributed'")
    if plan.mode == "distributed":
        want = plan.aggregator_options()
        if spec is None or spec.scheme != "bfv" or not math.isclose(
                spec.dp_mu, want.get("dp_mu", 0.0), rel_tol=1e-9
        ) or spec.dp_min != want.get("dp_min", 0):
            raise ConfigError(
                "distributed DP needs the clients' noise in a BFV aggregator: build it with "
                "hefl.crypto.make_aggregator('bfv', size, custody=..., "
                "**plan.aggregator_options()) for plan = hefl.dp(...).plan(num_clients, "
                "clients_per_round, rounds, size)")
    if spec is not None and spec.dp_std and (plan.mode != "central" or not math.isclose(
            spec.dp_std, plan.key_holder_std(spec), rel_tol=1e-9)):
        raise ConfigError(
            f"the key holder's keys add central DP noise of deviation {spec.dp_std:g}, but the "
            f"plan ({plan.mode}) needs " + (f"{plan.key_holder_std(spec):g}" if plan.mode ==
            "central" else "none there") + "; make the keys for this plan")
    if spec is not None and spec.max_clients < plan.max_clients:
        raise ConfigError(
            f"the aggregator holds at most {spec.max_clients} contributions but Poisson sampling "
            f"may bring {plan.max_clients}; build it with **plan.aggregator_options()")
    return plan


def _privatize(scheme: Scheme, plan: DpPlan, aggregator: Any, seed: int) -> Scheme:
    from hefl.privacy.roles import privatize

    spec = getattr(aggregator, "spec", None)
    # keys with dp_std: the key holder adds the central noise itself (as in deployment)
    inside = spec is not None and bool(spec.dp_std)
    return privatize(scheme, plan, quant_step(spec), np.random.default_rng([seed, 0xD9]),
                     noise=not inside)


def _client_eval(runner: Any, ids: list[Hashable], params: np.ndarray) -> dict[str, float]:
    res = [r for r in runner.evaluate(ids, params).values() if isinstance(r, EvaluateRes)]
    loss = weighted_mean([(r.loss, r.num_examples) for r in res])
    acc = weighted_mean([(r.metrics.get("accuracy", 0.0), r.num_examples) for r in res])
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


def _progress(enabled: bool | None, total: int):
    from rich.console import Console

    if enabled is None:
        console = Console()
        enabled = console.is_terminal or console.is_jupyter
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
    aggregator: Aggregator | Scheme | None = None,
    backend: str = "sequential",
    client_eval_every: int = 0,
    progress: bool | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    initial_params: np.ndarray | None = None,
    backend_options: Mapping[str, Any] | None = None,
    privacy: DpConfig | DpPlan | None = None,
) -> SimulationResult:
    """Federated training of ``model`` over ``data`` (TFF-style).

    Args:
        model: a model adapter (``TorchModel``, ``LogisticRegressionModel``).
        data: client id -> client data (and optionally the clients' own test splits).
        test: a central test set, evaluated every round.
        backend: how client steps run: ``"sequential"`` (default), ``"vectorized"``, ``"ray"``.
        backend_options: passed to ``make_runner`` (e.g. ``{"device": "cuda"}``).

    The other arguments are those of ``run``.
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
            privacy=privacy,
        )
    finally:
        close = getattr(runner, "close", None)
        if callable(close):
            close()
