"""One federated round, written once: pure steps that the simulation driver
(``hefl.simulation.run``) and the deployed coordinator (``hefl.net.coordinator``) both call.

    plan     = plan_round(ids, per_round, seed, algorithm, r)         server: who, with what config
    answer   = client_answer(encoder, id, global, fit outcome)        client: FitRes -> payload
    contrib  = accept(summer, id, answer)                             server: validate one answer
    params, state, record = finish_round(plan, contribs, rejected,    server (+ key holder):
                                         summer, decoder, ...)          sum, decode, optimizer step

Only how an answer travels differs (in-process call, Ray, gRPC). What is refused, and why, is
decided here: a client whose fit raised, whose update is malformed, or that sent nothing is left
out of the round with its reason, and the round goes on; a round with nothing usable keeps the
global model and is recorded as skipped, with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hefl.algorithms import Algorithm
from hefl.client import FitConfig, FitRes
from hefl.errors import (
    ClientError,
    ConfigError,
    CryptoError,
    HeflError,
    RetryRound,
    RoundError,
    UpdateRejected,
)
from hefl.roles import Decoder, Encoder, Summer


def sample_clients(num_clients: int, per_round: int, seed: int, round_num: int) -> list[int]:
    """Indices of the clients taking part in round ``round_num`` (1-based).

    All clients if ``per_round >= num_clients``, else
    ``sorted(default_rng([seed, round]).choice(N, per_round, replace=False))`` (workload W1).
    """
    if num_clients < 1:
        raise ConfigError("there are no clients: the federated data set is empty")
    if per_round < 1:
        raise ConfigError(f"clients per round must be >= 1, got {per_round}")
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_num])
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def poisson_sample(num_clients: int, rate: float, seed: int, round_num: int,
                   rng: np.random.Generator | None = None) -> list[int]:
    """Indices of the clients in round ``round_num`` under Poisson sampling: each independently
    with probability ``rate`` (DP-FedAvg's sampling; the count varies and may be 0). ``rng``
    (deployment: OS entropy) replaces the draw from ``seed`` and the round."""
    if num_clients < 1:
        raise ConfigError("there are no clients: the federated data set is empty")
    rng = rng if rng is not None else np.random.default_rng([seed, round_num, 0x9015])
    return [int(i) for i in np.flatnonzero(rng.random(num_clients) < rate)]


def shuffle_seed(seed: int, round_num: int, index: int) -> int:
    """Seed of a client's local shuffling: ``round * 1_000_003 + index`` for seed 0 (W1)."""
    return (seed * 7_919 + round_num) * 1_000_003 + index


def fit_config(algorithm: Algorithm, seed: int, round_num: int, index: int) -> FitConfig:
    c = algorithm.client
    return FitConfig(
        round=round_num,
        lr=c.lr,
        epochs=c.epochs,
        batch_size=c.batch_size,
        prox_mu=c.prox_mu,
        seed=shuffle_seed(seed, round_num, index),
    )


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part in a round and the config each one trains with."""

    round: int
    chosen: tuple[Hashable, ...]
    configs: Mapping[Hashable, FitConfig]


def plan_round(
    ids: Sequence[Hashable], per_round: int, seed: int, algorithm: Algorithm, round_num: int,
    poisson_rate: float | None = None, rng: np.random.Generator | None = None,
) -> RoundPlan:
    """Sample round ``round_num``'s clients from ``ids`` (in that order) and make their configs
    (a client's shuffling seed depends on its position in ``ids``). ``poisson_rate``: sample
    each client with that probability instead of exactly ``per_round`` (DP runs), drawn from
    ``rng`` if given."""
    idx = (sample_clients(len(ids), per_round, seed, round_num) if poisson_rate is None
           else poisson_sample(len(ids), poisson_rate, seed, round_num, rng))
    return RoundPlan(
        round_num,
        tuple(ids[i] for i in idx),
        {ids[i]: fit_config(algorithm, seed, round_num, i) for i in idx},
    )


@dataclass(frozen=True)
class Answer:
    """What a client sends back for a fit task: an encoded payload (None when it has no
    examples), or the reason it has none (``error``; never its data)."""

    payload: Any
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None


def failure_reason(outcome: object) -> str:
    """The reason recorded for a client whose fit did not produce a result."""
    if outcome is None:
        return "no result returned"
    if isinstance(outcome, ClientError):
        return outcome.reason
    if isinstance(outcome, HeflError):
        return str(outcome)
    return f"fit raised {type(outcome).__name__}: {outcome}"


def client_payload(
    encoder: Encoder, client_id: Hashable, global_params: np.ndarray, res: FitRes
) -> Any:
    """Client side: the delta ``res.params - global`` (in float64) weighted by sample count,
    encoded. Raises ``UpdateRejected`` (from the encoder) for a malformed update."""
    p = np.asarray(res.params)
    if p.dtype.kind != "f":
        p = p.astype(np.float64)
    delta = np.subtract(p, global_params, dtype=np.float64)  # float32 params: no float64 copy
    return encoder.encode(client_id, delta, float(res.num_examples))


def nonfinite_metrics(metrics: Mapping[str, float]) -> list[str]:
    """The names of the NaN/Inf metrics (sorted)."""
    return sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))


def client_answer(
    encoder: Encoder, client_id: Hashable, global_params: np.ndarray, outcome: object
) -> Answer:
    """Client side of one fit task: its result encoded, or the reason it failed (a raised
    exception, a malformed update). Never raises for the client's own failure."""
    if not isinstance(outcome, FitRes):
        return Answer(None, 0, {}, failure_reason(outcome))
    if outcome.num_examples <= 0:
        return Answer(None, 0, dict(outcome.metrics))  # nothing to contribute (weight 0)
    bad = nonfinite_metrics(outcome.metrics)
    if bad:  # refused by ``accept`` anyway: never encoded (a pooled sum could not drop it)
        return Answer(None, 0, {}, f"metrics {bad} are NaN/Inf")
    try:
        payload = client_payload(encoder, client_id, global_params, outcome)
    except UpdateRejected as e:
        return Answer(None, 0, {}, e.reason)
    return Answer(payload, outcome.num_examples, dict(outcome.metrics))


@dataclass(frozen=True)
class Contribution:
    """One client's accepted answer, as the server holds it until the round closes."""

    payload: Any
    num_examples: int
    metrics: Mapping[str, float]
    nbytes: int
    accept_s: float = 0.0  # server time spent reading and validating it (``accept`` and before)


def accept(summer: Summer, client_id: Hashable, answer: Answer, nbytes: int | None = None,
           read_s: float = 0.0) -> Contribution:
    """Server side: validate one answer as it arrives (``read_s``: time already spent reading
    it, added to the contribution's ``accept_s``).

    Raises:
        UpdateRejected: the client reported a failure, or its answer is malformed (NaN metrics,
            a body without examples, a payload the summer refuses).
    """
    if answer.error is not None:
        raise UpdateRejected(answer.error, client_id=client_id, stage="fit")
    bad = nonfinite_metrics(answer.metrics)
    if bad:
        raise UpdateRejected(f"metrics {bad} are NaN/Inf", client_id=client_id, stage="submit")
    if answer.num_examples < 0:
        raise UpdateRejected("negative number of examples", client_id=client_id, stage="submit")
    if answer.num_examples == 0:
        if answer.payload is not None:
            raise UpdateRejected(
                "a client with 0 examples must send no update", client_id=client_id,
                stage="submit",
            )
        return Contribution(None, 0, dict(answer.metrics), 0)
    t0 = time.perf_counter()
    summer.validate(client_id, answer.payload)
    size = summer.nbytes(answer.payload) if nbytes is None else nbytes
    return Contribution(answer.payload, answer.num_examples, dict(answer.metrics), size,
                        read_s + time.perf_counter() - t0)


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round (one row of the metrics history).

    Phase times (seconds; None where this process cannot see the phase): ``encode_s`` the
    clients' encoding of their updates (quantize, pack, encrypt, serialize; summed over the
    clients: in simulation, one after the other), ``aggregate_s`` the server's validating and
    summing of the payloads, ``decode_s`` the decryption of the sum (in deployment, including
    the wait for the key holder or committee).
    """

    round: int
    selected: int
    contributors: int
    total_weight: float
    train_loss: float | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)
    skipped: bool = False
    wall_s: float = 0.0
    upload_bytes: int = 0
    skip_reason: str = ""
    dp_epsilon: float | None = None
    encode_s: float | None = None
    aggregate_s: float | None = None
    decode_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = dict(self.metrics)
        d["rejected"] = {str(k): v for k, v in self.rejected.items()}
        return d


def weighted_mean(values: Sequence[tuple[float, int]]) -> float | None:
    """``sum(v * n) / sum(n)`` over (value, count) pairs; None when the counts sum to 0."""
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else None


def finish_round(
    plan: RoundPlan,
    contributions: Mapping[Any, Contribution],
    rejected: Mapping[Any, str],
    *,
    summer: Summer,
    decoder: Decoder,
    algorithm: Algorithm,
    params: np.ndarray,
    opt_state: Any,
    evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
    started: float | None = None,
    encode_s: float | None = None,
) -> tuple[np.ndarray, Any, RoundRecord]:
    """Sum the contributions (in the plan's order, not arrival order), decode, apply the server
    optimizer and record the round.

    A round with nothing usable (no contributor, a decoder that refuses) keeps ``params`` and is
    recorded as skipped with ``skip_reason``. ``RetryRound`` from the decoder (no key holder
    answered) propagates: the caller retries the attempt. ``encode_s`` (the clients' encoding
    time, where the caller saw it), the contributions' ``accept_s`` and the time spent here
    summing and decoding make the record's phase times.
    """
    order = [cid for cid in plan.chosen if cid in contributions]
    payloads = {cid: contributions[cid].payload for cid in order if contributions[cid].num_examples > 0}
    losses = [
        (float(contributions[cid].metrics["loss"]), contributions[cid].num_examples)
        for cid in payloads
        if "loss" in contributions[cid].metrics
    ]
    t0 = time.perf_counter()
    agg = summer.aggregate(payloads)
    t1 = time.perf_counter()
    out_rejected = {**rejected, **agg.rejected}
    weight, reason = 0.0, ""
    decode_s = None
    try:
        try:
            mean, weight = decoder.decode(agg)
        finally:
            decode_s = time.perf_counter() - t1
        params, opt_state = algorithm.server.apply(params, mean, opt_state)
    except RetryRound:
        raise
    except (RoundError, CryptoError) as e:
        reason = str(e)  # nothing usable: keep the global model, record why
    metrics = {k: float(v) for k, v in (evaluate(params) if evaluate else {}).items()}
    record = RoundRecord(
        round=plan.round,
        selected=len(plan.chosen),
        contributors=agg.count,
        total_weight=float(weight),
        train_loss=weighted_mean(losses),
        metrics=metrics,
        rejected={str(k): v for k, v in out_rejected.items()},
        skipped=bool(reason),
        wall_s=time.perf_counter() - started if started is not None else 0.0,
        upload_bytes=sum(contributions[cid].nbytes for cid in payloads),
        skip_reason=reason,
        encode_s=encode_s,
        aggregate_s=sum(contributions[c].accept_s for c in order) + (t1 - t0),
        decode_s=decode_s,
    )
    return params, opt_state, record


def nothing_trained(records: Sequence[RoundRecord]) -> str | None:
    """Why a run whose every round was skipped trained nothing (None if some round trained):
    the last round's skip reason and its rejections."""
    if not records or any(not r.skipped for r in records):
        return None
    last = records[-1]
    why = "; ".join(f"{c}: {reason}" for c, reason in last.rejected.items())
    return (
        f"nothing was trained: all {len(records)} round(s) were skipped. Last round: "
        f"{last.skip_reason}" + (f" (rejected: {why})" if why else "")
    )
