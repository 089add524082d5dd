"""The federation's round state machine, with no transport: sessions, tasks, deadlines, retries
and who decodes. It imports no grpc; ``hefl.net.grpc_service`` serves it over gRPC and
``hefl.net.memory`` in-process (tests, attack tests), the same object in both.

Each round (one *attempt* at a time), with the steps of ``hefl.rounds``:

    plan = plan_round(names, per_round, seed, algorithm, r)      same as hefl.simulation.run
    wait up to join/start timeout for the chosen clients to be connected
    push a FIT task (global params + config) on each participant's session; distributed DP:
        the config announces dp_count, the answers the round waits for (each client's noise
        share is sized for it)
    accept(summer, name, answer) as answers arrive: a failure a client reports (its fit raised,
        its update was malformed) or a payload the summer refuses is recorded with its reason
    close when every participant answered or dropped, the wait fraction is reached, or the
        round deadline passes; fewer than min_clients (or dp_count) answers -> the attempt
        is retried
    finish_round(...): sum in the plan's order -> decode (here in plaintext; by a key holder
        reached through a DECODE task when encrypted) -> server optimizer -> commit atomically

Time comes from an injectable ``Clock`` (``RealClock`` in deployment, ``hefl.net.memory.FakeClock``
in tests), so deadlines are tested without waiting. Every refusal is a ``hefl.errors.Refused``
with a transport-neutral code (gRPC's status names) and a reason the other side prints.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError

from hefl.aggregation import Aggregate
from hefl.client import FitConfig
from hefl.data.federated import ClientData
from hefl.errors import (
    ClientError,
    ConfigError,
    CryptoError,
    Refused,
    RetryRound,
    RoundError,
    TransportError,
)
from hefl.history import History
from hefl.net import wire
from hefl.net.config import (
    RunConfig,
    build_aggregator,
    build_algorithm,
    build_model,
    is_encrypted,
    load_registry,
)
from hefl.net.data import load_client_data
from hefl.net.decrypt import registry_signers
from hefl.net.files import file_stamp
from hefl.net.identity import digest, statement, verify
from hefl.net.logs import event, get_logger
from hefl.net.privacy import check_keys, run_plan
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.status import run_title
from hefl.net.store import StateLock, Store, write_atomic
from hefl.privacy.roles import DpDecoder
from hefl.rounds import (
    Answer,
    Contribution,
    RoundPlan,
    accept,
    finish_round,
    nothing_trained,
    plan_round,
)


class Clock(Protocol):
    """Where the coordinator's time comes from."""

    def now(self) -> float: ...

    def wait(self, cond: threading.Condition, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait on ``cond`` (held) until ``predicate()`` is true or ``timeout`` seconds pass;
        returns the predicate's last value."""
        ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, predicate: Callable[[], Any], timeout: float) -> Any:
        return cond.wait_for(predicate, timeout=max(0.0, timeout))


class NoKeyHolder(RetryRound):
    """No key holder could decrypt this round's aggregate (the round is retried)."""


@dataclass
class Session:
    """One live task stream of a client."""

    name: str
    key_holder: bool = False
    alive: bool = True
    sent: set[str] = field(default_factory=set)


@dataclass
class DecodeTask:
    """A decode request sent to one key holder; its answer is the mean delta and total weight,
    or (threshold custody, ``members`` set) its partial decryption for that decrypting set."""

    round: int
    task_id: str
    target: str
    body: bytes
    members: tuple[int, ...] = ()
    answer: tuple[np.ndarray, float] | None = None
    partial: Any = None  # a ThresholdPartial
    error: str | None = None
    open: bool = True

    def settled(self) -> bool:
        return self.answer is not None or self.partial is not None or self.error is not None


@dataclass
class FitTask:
    round: int
    attempt: int
    task_id: str
    plan: RoundPlan
    participants: frozenset[str]
    body: bytes
    results: dict[str, Contribution] = field(default_factory=dict)
    signed: dict[str, pb.SignedUpdate] = field(default_factory=dict)  # encrypted runs
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # refused answers (may be resent)
    failed: set[str] = field(default_factory=set)  # reported their own failure: final
    open: bool = True
    model: bytes = b""  # SHA-256 of the body: the model digest clients sign
    dp_count: int = 0  # distributed DP: the contributions announced (clients size noise for it)
    running: Any = None  # encrypted runs: the sum of the accepted updates (``RunningSum``)

    def __post_init__(self) -> None:
        self.model = digest(self.body)

    def settled(self) -> bool:
        return all(
            n in self.results or n in self.dropped or n in self.failed for n in self.participants
        )


def config_pb(c: FitConfig) -> pb.FitConfig:
    return pb.FitConfig(
        round=c.round, lr=c.lr, epochs=c.epochs, batch_size=c.batch_size, prox_mu=c.prox_mu,
        seed=c.seed,
    )


def parse(cls: Any, raw: bytes, what: str) -> Any:
    try:
        return cls.FromString(raw)
    except (DecodeError, TypeError, ValueError) as e:
        raise Refused("INVALID_ARGUMENT", f"malformed {what}: {e}") from e


class RemoteDecoder:
    """The decoder role in an encrypted deployment: a key holder reached by a DECODE task.

    What it sends is not the server's sum but a ``DecodeRequest``: the signed contributions the
    sum was made of (``request(aggregate)`` builds it), so the key holder can verify every one
    and recompute the sum itself (``hefl.net.decrypt``)."""

    def __init__(self, coordinator: Coordinator, round_num: int,
                 request: Callable[[Aggregate], bytes]) -> None:
        self.coordinator = coordinator
        self.round = round_num
        self.request = request

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        if aggregate.count == 0:
            raise RoundError("no usable client updates this round; nothing to decrypt")
        body = self.request(aggregate)
        if self.coordinator.committee:
            return self.coordinator.threshold_decode(self.round, body, aggregate)
        return self.coordinator.remote_decode(self.round, body)


class RemoteMember:
    """A threshold key holder as ``hefl.crypto.secure_sum.Committee`` sees it: ``partial`` sends
    it the round's decode request for a decrypting set and waits for its partial decryption."""

    def __init__(self, coordinator: Coordinator, party: int, name: str, round_num: int,
                 body: bytes, deadline: float) -> None:
        self.coordinator, self.party, self.name = coordinator, party, name
        self.round, self.body, self.deadline = round_num, body, deadline

    def partial(self, total: Any, members: Sequence[int]) -> Any:
        from hefl.errors import DecodeRefused, MemberUnavailable

        c = self.coordinator
        if not c._live(self.name):
            raise MemberUnavailable(f"key holder {self.name!r} is not connected")
        task = c._ask(self.round, self.name, self.body, tuple(members), self.deadline)
        if task.error is not None:
            raise DecodeRefused(f"key holder {self.name!r} refused to decrypt: {task.error}")
        if task.partial is None:
            raise MemberUnavailable(f"key holder {self.name!r} did not answer")
        return task.partial


class Coordinator:
    """Runs one configured run to completion (resuming from its state directory).

    Transports call ``authenticate``, ``join``, ``subscribe`` / ``next_task`` / ``disconnect``
    and ``submit``; ``run`` drives the rounds (in its own thread). Nothing here knows gRPC.
    """

    def __init__(
        self, cfg: RunConfig, log: logging.Logger | None = None, clock: Clock | None = None
    ) -> None:
        self.cfg = cfg
        self.run_id = cfg.run_id
        self.clock: Clock = clock or RealClock()
        self.names = [c.name for c in cfg.clients if c.role == "client"]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.encrypted = is_encrypted(cfg.aggregation)
        self.registry = {c.name: c for c in cfg.clients}
        self._registry_stamp = file_stamp(cfg.registry)
        # encrypted runs: whose signatures a contribution must carry (the key holder checks
        # them again against its own copy of the registry)
        self.signers = registry_signers(cfg.clients) if self.encrypted else {}
        self.algorithm = build_algorithm(cfg.algorithm)
        self.model = build_model(cfg.model)
        self.size = int(self.model.spec.size)
        self.summer = build_aggregator(cfg.aggregation, self.size)  # never a secret key
        # differential privacy (hefl.net.privacy): the plan, and Poisson draws no seed predicts
        self.privacy = run_plan(cfg, self.size)
        if self.encrypted:
            check_keys(self.privacy, self.summer.spec)
        self._sampler = np.random.default_rng()
        # distributed DP: the key holder refuses sums below dp_min, so wait for that many
        self.min_clients = max(cfg.server.min_clients,
                               self.privacy.min_clients if self.privacy else 0)
        # threshold custody: the committee, member j = committee[j - 1]
        self.committee = self._committee(cfg) if self.encrypted else []
        # one server per state dir: a second one (another port, same dir) is refused here
        self.lock = StateLock(cfg.state_dir, cfg.server.address)
        try:
            self.log = log or get_logger("hefl.server", file=cfg.state_dir / "server.log")
            self.store = Store(cfg.state_dir)
            self.test: ClientData | None = (
                load_client_data(cfg.server.test_data, cfg.server.preprocessing, strict=False)
                if cfg.server.test_data else None
            )
        except BaseException:
            self.lock.release()
            raise
        self.cond = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.task: FitTask | None = None
        self.decoding: dict[str, DecodeTask] = {}
        self.completed = 0
        self.retries = 0  # attempts abandoned so far (for status and tests)
        self.done = False
        self.stopping = threading.Event()
        mb = cfg.server.max_update_mb
        self.max_body = wire.body_cap(self.size) if mb is None else int(mb * (1 << 20))
        self.life = secrets.token_hex(4)  # distinguishes task ids across server restarts

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Ask ``run`` to stop at the next step (it raises ``RoundError``); safe from any
        thread. Completed rounds stay on disk; the round in flight is redone on restart."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        self.request_stop()
        self.store.close()
        self.lock.release()

    def _wait(self, predicate: Callable[[], Any], timeout: float) -> Any:
        """Wait (holding ``cond``) until ``predicate`` or stopping, at most ``timeout`` s."""
        return self.clock.wait(self.cond, lambda: self.stopping.is_set() or predicate(), timeout)

    # ------------------------------------------------------------------ the round driver

    def run(self) -> History:
        """Run (or resume) the configured rounds; returns the run's full history.

        Raises:
            RoundError: stopped before the end, a round failed ``max_attempts`` times, or
                every round was skipped (``NothingTrained``-style message with the reasons).
        """
        cfg = self.cfg
        init = self.model.init_vector()
        self._check_dp_rounds()
        opened = self.store.open_run(
            self.run_id, cfg.public_dict(), rounds=cfg.rounds, initial=init,
            opt_state=wire.pack_state(self.algorithm.server.init(init)),
        )
        self.store.register_clients(self.run_id, [(c.name, c.revoked) for c in cfg.clients])
        last, params, state_bytes = self.store.resume_point(self.run_id)
        opt_state = wire.unpack_state(state_bytes)
        self.completed = last
        event(self.log, "resumed" if opened else "run_started", run_id=self.run_id,
              last_completed_round=last, rounds=cfg.rounds, clients=len(self.names),
              outcome=opened.outcome, previous_rounds=opened.previous_rounds,
              message=opened.message)
        first = True
        for r in range(last + 1, cfg.rounds + 1):
            if self.privacy is not None and (budget := self.privacy.over_budget(r)):
                event(self.log, "privacy_budget_reached", level=logging.WARNING, round=r,
                      reason=budget)
                break
            attempt = 0
            while True:
                attempt += 1
                out = self._attempt(r, attempt, params, opt_state, first)
                first = False
                if out is not None:
                    params, opt_state = out
                    break
                with self.cond:
                    self.retries += 1
                    self.cond.notify_all()
                if self.stopping.is_set():
                    raise RoundError("server stopped before the run finished; restart to resume")
                if cfg.server.max_attempts and attempt >= cfg.server.max_attempts:
                    raise RoundError(
                        f"round {r} failed {attempt} times (fewer than min_clients="
                        f"{self.min_clients} answers); state is kept, restart to retry"
                    )
                with self.cond:
                    self._wait(lambda: False, cfg.server.retry_delay_s)
        self.store.set_status(self.run_id, "finished")
        history = History(self.store.records(self.run_id))
        self._export(history, plot=True)
        event(self.log, "run_finished", run_id=self.run_id, rounds=len(history))
        with self.cond:
            self.done = True
            self.cond.notify_all()
            self._wait(lambda: not self.sessions, 5.0)  # let clients hear DONE
            if cfg.server.linger_s > 0:  # a client that (re)joins now learns the run is over
                event(self.log, "lingering", seconds=cfg.server.linger_s)
                self._wait(lambda: False, cfg.server.linger_s)
        why = nothing_trained(history.records)
        if why is not None:
            event(self.log, "nothing_trained", level=logging.ERROR, reason=why)
            raise RoundError(why)
        return history

    def _check_dp_rounds(self) -> None:
        """A target epsilon sizes the noise for the configured rounds: such a run cannot be
        extended or shortened once rounds ran with that noise.

        Raises:
            ConfigError: ``rounds`` changed for a DP run calibrated to a target epsilon.
        """
        dp = self.privacy.config if self.privacy is not None else None
        if dp is None or dp.noise_multiplier is not None:
            return
        for info in self.store.runs():
            if info.run_id == self.run_id and info.rounds != self.cfg.rounds and (
                    self.store.completed_rounds(self.run_id)):
                raise ConfigError(
                    f"run {self.run_id} was calibrated to epsilon {dp.epsilon:g} over "
                    f"{info.rounds} rounds and has run some: its noise cannot be re-sized to "
                    f"{self.cfg.rounds}. Keep rounds = {info.rounds}, or start a new run "
                    "(another [run] name) planned for the rounds you want")

    def _note(self, name: str, what: str) -> None:
        """Record a client's last event for ``hefl status`` (best effort, never fatal)."""
        with contextlib.suppress(sqlite3.Error):
            self.store.client_event(self.run_id, name, what)

    def _live(self, name: str) -> bool:
        s = self.sessions.get(name)
        return s is not None and s.alive

    def _attempt(
        self, r: int, attempt: int, params: np.ndarray, opt_state: Any, first: bool
    ) -> tuple[np.ndarray, Any] | None:
        s = self.cfg.server
        t0 = time.perf_counter()
        self.refresh_registry()  # a client revoked since the last round is not waited for
        plan = plan_round(self.names, self.cfg.clients_per_round, self.cfg.seed, self.algorithm, r,
                          *((self.privacy.sampling_rate, self._sampler) if self.privacy else ()))
        pending = self._pending(r)
        if pending.exists():  # a previous life asked for this round's decryption: ask again
            return self._finish_pending(plan, attempt, params, opt_state, t0)
        chosen = [str(n) for n in plan.chosen]
        wanted = [n for n in chosen if not self.registry[n].revoked]  # revoked never connect
        key, wait = (("start_timeout_s", s.start_timeout_s) if first
                     else ("join_timeout_s", s.join_timeout_s))
        with self.cond:
            absent = [n for n in wanted if not self._live(n)]
            if absent:  # say why the round has not started yet, and what bounds the wait
                event(self.log, "waiting_for_clients", round=r, attempt=attempt, absent=absent,
                      seconds=wait, setting=f"[server] {key}")
            self._wait(lambda: all(self._live(n) for n in wanted), wait)
            participants = frozenset(n for n in chosen if self._live(n))
            if len(participants) < self.min_clients:
                event(self.log, "round_retry", level=logging.WARNING, round=r, attempt=attempt,
                      reason=f"{len(participants)} of {len(chosen)} chosen clients connected, "
                      f"min_clients={self.min_clients}", absent=sorted(set(chosen) - participants))
                return None
            need = math.ceil(s.wait_fraction * len(participants))
            # distributed DP: clients size their noise shares for the count the round waits
            # for; a sum of fewer carries less noise and is refused by whoever decrypts it
            shares = self.privacy is not None and self.privacy.mode == "distributed"
            task = FitTask(r, attempt, f"{self.run_id}/{r}/{attempt}/{self.life}", plan,
                           participants, wire.vector_bytes(params),
                           dp_count=max(self.min_clients, need) if shares else 0,
                           # a key holder recomputes the sum from the signed updates; only
                           # threshold members fuse their partials with the server's own sum
                           running=self.summer.running(keep=bool(self.committee))
                           if self.encrypted else None)
            floor = task.dp_count or self.min_clients
            self.task = task
            self.cond.notify_all()
        event(self.log, "round_started", round=r, attempt=attempt, chosen=chosen,
              participants=sorted(participants),
              **({"dp_count": task.dp_count} if task.dp_count else {}))
        deadline = self.clock.now() + s.round_timeout_s
        with self.cond:
            self._wait(lambda: task.settled() or len(task.results) >= need,
                       deadline - self.clock.now())
            task.open = False
            self.task = None
            results = dict(task.results)
            signed = dict(task.signed)
            rejected = {n: "not connected at round start" for n in chosen if n not in participants}
            for n in participants:
                if n not in results:
                    rejected[n] = task.rejected.get(n) or task.dropped.get(
                        n, "straggler: no answer before the round closed"
                    )
        if self.stopping.is_set():
            return None  # shutting down: leave the round to the next server life
        if len(results) < floor:
            event(self.log, "round_retry", level=logging.WARNING, round=r, attempt=attempt,
                  reason=f"{len(results)} answers, min_clients={self.min_clients}"
                  + (f", distributed DP noise announced for {floor}" if task.dp_count else ""),
                  rejected=rejected)
            return None
        model = task.model

        def request(agg: Aggregate) -> bytes:
            body = pb.DecodeRequest(
                run_id=self.run_id, round=r, model_digest=model,
                updates=[signed[str(c)] for c in agg.contributors]).SerializeToString()
            write_atomic(self._pending(r).with_suffix(".json"),
                         json.dumps({"rejected": {**rejected, **agg.rejected},
                                     "chosen": chosen}))
            write_atomic(self._pending(r), body)  # before the key holder can answer it
            return body

        decoder = RemoteDecoder(self, r, request) if self.encrypted else self.summer
        return self._finish(plan, attempt, results, rejected, decoder, params, opt_state, t0,
                            summer=task.running)

    def _finish(self, plan: RoundPlan, attempt: int, results: Mapping[str, Contribution],
                rejected: Mapping[str, str], decoder: Any, params: np.ndarray, opt_state: Any,
                t0: float, summer: Any = None) -> tuple[np.ndarray, Any] | None:
        """Close the round (``finish_round``) with ``summer`` (default: the run's; a round's
        ``RunningSum`` already holds the sum of its accepted updates)."""
        r = plan.round
        if self.privacy is not None:  # the mean over the expected count, central noise if ours
            decoder = DpDecoder(decoder, self.privacy.clients_per_round,
                                0.0 if self.encrypted or self.privacy.mode != "central"
                                else self.privacy.sum_std(), np.random.default_rng())
        evaluate = (lambda p: {f"test_{k}": v for k, v in self.model.evaluate(p, self.test).items()
                               if k != "n"}) if self.test is not None else None
        try:
            params, opt_state, record = finish_round(
                plan, results, rejected, summer=summer or self.summer, decoder=decoder,
                algorithm=self.algorithm, params=params, opt_state=opt_state, evaluate=evaluate,
                started=t0,
            )
        except RetryRound as e:
            event(self.log, "round_retry", level=logging.WARNING, round=r, attempt=attempt,
                  reason=str(e))
            return None
        if self.privacy is not None:
            record = replace(record, dp_epsilon=self.privacy.epsilon(r))
        if record.skipped:
            event(self.log, "round_skipped", level=logging.WARNING, round=r,
                  reason=record.skip_reason)
        self.store.commit_round(self.run_id, record, params, wire.pack_state(opt_state))
        for p in (self._pending(r), self._pending(r).with_suffix(".json")):
            p.unlink(missing_ok=True)
        with self.cond:
            self.completed = r
        self._export(History(self.store.records(self.run_id)), plot=False)
        event(self.log, "round_completed", round=r, attempt=attempt,
              contributors=record.contributors, selected=record.selected,
              rejected=dict(record.rejected), wall_s=round(record.wall_s, 4),
              metrics=dict(record.metrics))
        return params, opt_state

    def _pending(self, r: int) -> Path:
        """Where this round's decode request is kept until the round is committed."""
        return self.cfg.state_dir / "pending" / f"{self.run_id}-r{r}.decode"

    def _finish_pending(self, plan: RoundPlan, attempt: int, params: np.ndarray, opt_state: Any,
                        t0: float) -> tuple[np.ndarray, Any] | None:
        """Finish a round whose decryption a previous server life requested: send the key
        holder the very same request (it answers the same request once more, and only it)."""
        r = plan.round
        body = self._pending(r).read_bytes()
        meta = json.loads(self._pending(r).with_suffix(".json").read_text())
        req = pb.DecodeRequest.FromString(body)
        if "chosen" in meta:  # Poisson-sampled: this life drew another sample
            plan = replace(plan, chosen=tuple(meta["chosen"]))
        results = {u.client: Contribution(self.summer.loads(u.payload), 1, {}, len(u.payload))
                   for u in req.updates}
        event(self.log, "decode_resumed", round=r, attempt=attempt, contributors=len(results))
        decoder = RemoteDecoder(self, r, lambda agg: body)
        return self._finish(plan, attempt, results, meta["rejected"], decoder, params, opt_state,
                            t0)

    def remote_decode(self, r: int, body: bytes) -> tuple[np.ndarray, float]:
        """Send a decode request to a live key holder and wait for the mean and total weight.

        Raises:
            RoundError: the key holder refused (the round is skipped).
            NoKeyHolder: no key holder answered in time (the round is retried).
        """
        deadline = self.clock.now() + self.cfg.server.round_timeout_s
        with self.cond:
            self._wait(self._key_holders, deadline - self.clock.now())
            holders = self._key_holders()
            if not holders:
                raise NoKeyHolder("no key holder is connected to decrypt the aggregate")
        task = self._ask(r, holders[0], body, (), deadline)
        if task.error is not None:
            raise RoundError(f"key holder {task.target!r} refused to decrypt: {task.error}")
        if task.answer is None:
            raise NoKeyHolder(f"key holder {task.target!r} did not answer")
        return task.answer

    def threshold_decode(self, r: int, body: bytes, aggregate: Aggregate
                         ) -> tuple[np.ndarray, float]:
        """Threshold custody: ask ``threshold`` live members for partial decryptions of the
        request, fuse them with this server's own sum (``Committee``), skipping members that
        are down and naming one whose partial fails the checks.

        Raises:
            RoundError: a member refused, or no decrypting set gave a valid aggregate (skipped).
            NoKeyHolder: fewer than ``threshold`` members answered in time (retried).
        """
        from hefl.crypto.secure_sum import Committee
        from hefl.errors import DecodeRefused, KeyCustodyError

        t = self.summer.spec.threshold
        deadline = self.clock.now() + self.cfg.server.round_timeout_s
        with self.cond:
            self._wait(lambda: len(self._live_members()) >= t, deadline - self.clock.now())
            missing = [n for n in self.committee if n not in self._live_members()]
        if missing:
            event(self.log, "key_holders_missing", level=logging.WARNING, round=r,
                  missing=missing, threshold=t)
            for n in missing:  # `hefl status` lists them
                self._note(n, f"missing from the committee in round {r} (threshold {t})")
        committee = Committee(self.summer.public, [
            RemoteMember(self, j, name, r, body, deadline)
            for j, name in enumerate(self.committee, start=1)])
        try:
            result = committee.decode(aggregate.payload)
        except DecodeRefused as e:
            raise RoundError(str(e)) from e
        except KeyCustodyError as e:
            raise NoKeyHolder(str(e)) from e
        except CryptoError as e:
            raise RoundError(f"threshold decryption failed: {e}") from e
        if committee.suspects:
            event(self.log, "key_holder_suspect", level=logging.WARNING, round=r,
                  key_holders=[self.committee[j - 1] for j in committee.suspects])
        return result

    def _ask(self, r: int, target: str, body: bytes, members: tuple[int, ...],
             deadline: float) -> DecodeTask:
        """Push one decode task to ``target`` and wait until it answers, drops or times out."""
        task = DecodeTask(r, f"{self.run_id}/{r}/decode/{secrets.token_hex(4)}", target, body,
                          members)
        with self.cond:
            self.decoding[task.task_id] = task
            self.cond.notify_all()
        extra: dict[str, Any] = {"members": list(members)} if members else {}
        event(self.log, "decode_requested", round=r, key_holder=target, bytes=len(body), **extra)
        with self.cond:
            self._wait(lambda: task.settled() or not self._live(target),
                       deadline - self.clock.now())
            task.open = False
            self.decoding.pop(task.task_id, None)
        return task

    def _committee(self, cfg: RunConfig) -> list[str]:
        """``[aggregation] key_holders`` when the public context is a threshold key."""
        spec = self.summer.spec
        names = list(cfg.aggregation.get("key_holders") or [])
        if not spec.parties:
            if names:
                raise ConfigError("[aggregation] key_holders applies to custody 'threshold' "
                                  "only; the public context holds a single key")
            return []
        if len(names) != spec.parties or spec.threshold != cfg.aggregation.get(
                "threshold", spec.threshold):
            raise ConfigError(
                f"the public context is a {spec.threshold}-of-{spec.parties} threshold key but "
                f"[aggregation] names key_holders {names} and threshold "
                f"{cfg.aggregation.get('threshold')}; list its committee in member order")
        roles = {c.name: c.role for c in cfg.clients}
        wrong = [n for n in names if roles.get(n) != "keyholder"]
        if wrong:
            raise ConfigError(f"committee member(s) {wrong} are not registered with "
                              "role = \"keyholder\" (hefl certs --key-holders ...)")
        return names

    def _live_members(self) -> list[str]:
        return [n for n in self.committee if self._live(n)]

    def _key_holders(self) -> list[str]:
        return [n for n, s in self.sessions.items() if s.alive and s.key_holder]

    def _export(self, history: History, plot: bool) -> None:
        rows = "".join(json.dumps(r.to_dict()) + "\n" for r in history)
        write_atomic(self.cfg.state_dir / "metrics.jsonl", rows)
        if plot and len(history):
            import warnings

            with warnings.catch_warnings():  # a run without a test set has no accuracy curve
                warnings.simplefilter("ignore", UserWarning)
                history.plot(self.cfg.state_dir / "run.png",
                             title=run_title(self.cfg.public_dict()))

    # ------------------------------------------------------------------ authentication

    def authenticate(self, token: wire.Token, cert_names: Sequence[str] | None, peer: str = "") -> str:
        """The registered name behind ``token`` (and, with mTLS, the client certificate's
        common names); raises ``Refused`` otherwise."""
        self.refresh_registry()
        entry = self.registry.get(token.name)
        if entry is None or not hmac.compare_digest(entry.token_sha256, token.sha256):
            event(self.log, "auth_refused", level=logging.WARNING, client=token.name, peer=peer)
            raise Refused("UNAUTHENTICATED",
                          f"unknown client {token.name!r} or wrong token; ask the operator")
        if entry.revoked:
            event(self.log, "auth_refused", level=logging.WARNING, client=token.name,
                  reason="revoked")
            raise Refused("PERMISSION_DENIED", f"client {token.name!r} is revoked")
        if self.cfg.tls.client_ca is not None and token.name not in (cert_names or ()):
            raise Refused("PERMISSION_DENIED",
                          f"client certificate {list(cert_names or ())} does not belong to "
                          f"{token.name!r}")
        return token.name

    def refresh_registry(self) -> None:
        """Revocations and token rotations written to the registry file take effect without a
        restart: the file is re-read when its size or mtime changed (one ``stat`` per
        authentication), and a revoked client's open stream is closed. Other changes (a new
        party, a new role) need a restart, and are logged so."""
        stamp = file_stamp(self.cfg.registry)
        if stamp == self._registry_stamp or self.cfg.registry is None:  # unchanged, or none
            return
        try:
            entries = load_registry(self.cfg.registry)
        except ConfigError as e:  # half-written or broken: keep the registry we have
            event(self.log, "registry_unreadable", level=logging.WARNING, error=str(e))
            return
        with self.cond:
            if stamp == self._registry_stamp:
                return
            self._registry_stamp = stamp
            for new in entries:
                old = self.registry.get(new.name)
                if old is None or old.role != new.role:
                    event(self.log, "registry_change_needs_restart", level=logging.WARNING,
                          client=new.name, change="new party" if old is None else "new role")
                    continue
                if (new.revoked, new.token_sha256) == (old.revoked, old.token_sha256):
                    continue
                self.registry[new.name] = replace(old, revoked=new.revoked,
                                                  token_sha256=new.token_sha256)
                event(self.log, "registry_updated", client=new.name, revoked=new.revoked,
                      token_changed=new.token_sha256 != old.token_sha256)
                sess = self.sessions.get(new.name)
                if sess is not None and (new.revoked or new.token_sha256 != old.token_sha256):
                    self.disconnect(sess, "credentials changed")  # its stream ends now
        with contextlib.suppress(sqlite3.Error):  # `hefl status` shows the revocation
            self.store.register_clients(
                self.run_id, [(c.name, self.registry[c.name].revoked) for c in self.cfg.clients])

    # ------------------------------------------------------------------ requests

    def join(self, name: str, req: pb.JoinRequest, peer: str = "") -> pb.JoinReply:
        if req.protocol_version != wire.PROTOCOL_VERSION:
            raise Refused("FAILED_PRECONDITION",
                          f"protocol version {req.protocol_version} is not supported; this "
                          f"server speaks {wire.PROTOCOL_VERSION}: upgrade hefl")
        event(self.log, "client_joined", client=name, peer=peer)
        self._note(name, "joined")
        return pb.JoinReply(
            run_id=self.run_id, protocol_version=wire.PROTOCOL_VERSION,
            model_json=json.dumps(dict(self.cfg.model)),
            aggregation_json=json.dumps(
                {**{k: v for k, v in self.cfg.aggregation.items() if k != "public"},
                 **({"privacy": {"clip": self.privacy.config.clip, "mode": self.privacy.mode}}
                    if self.privacy else {})}),
            index=self.index.get(name, 0), rounds=self.cfg.rounds,
        )

    def subscribe(self, name: str, req: pb.SubscribeRequest) -> Session:
        """Open the client's task stream (a reconnect supersedes its previous one)."""
        if req.run_id != self.run_id:
            raise Refused("FAILED_PRECONDITION",
                          f"wrong run {req.run_id!r}: this server runs {self.run_id!r}; join again")
        if req.key_holder and not self.encrypted:
            raise Refused("FAILED_PRECONDITION",
                          "this run aggregates in plaintext; it needs no key holder")
        role = self.registry[name].role
        if role == "keyholder" and not req.key_holder:
            raise Refused("PERMISSION_DENIED",
                          f"{name!r} is registered as a key holder; start it with --key-holder")
        if role != "keyholder" and req.key_holder:
            raise Refused("PERMISSION_DENIED",
                          f"{name!r} is registered as a data client, not a key holder: data "
                          "clients never decrypt (in any custody); only registry entries with "
                          "role = \"keyholder\" may")
        with self.cond:
            old = self.sessions.get(name)
            if old is not None:
                old.alive = False  # superseded by a reconnect
            sess = Session(name, req.key_holder)
            self.sessions[name] = sess
            self.cond.notify_all()
        event(self.log, "client_connected", client=name, key_holder=req.key_holder)
        self._note(name, "connected")
        return sess

    def next_task(self, sess: Session) -> tuple[pb.TaskHeader, bytes] | None:
        """The next task for this session, waiting up to a heartbeat interval: a task, a
        heartbeat, or None when the session is over (closed, superseded, server stopping)."""
        with self.cond:
            item = self._wait(lambda: self._next(sess), self.cfg.server.heartbeat_s)
        if item == "dead":
            return None
        if not item:
            return pb.TaskHeader(kind=pb.TASK_HEARTBEAT, run_id=self.run_id), b""
        return item  # type: ignore[no-any-return]

    def disconnect(self, sess: Session, reason: str) -> None:
        with self.cond:
            if self.sessions.get(sess.name) is sess:
                del self.sessions[sess.name]
                t = self.task
                if (sess.alive and t is not None and t.open and sess.name in t.participants
                        and sess.name not in t.results):
                    t.dropped[sess.name] = f"disconnected mid-round ({reason})"
                    event(self.log, "client_dropped", level=logging.WARNING, client=sess.name,
                          round=t.round, attempt=t.attempt)
            was_alive, sess.alive = sess.alive, False
            self.cond.notify_all()
        if was_alive:
            event(self.log, "client_disconnected", client=sess.name)
            if not self.stopping.is_set():
                self._note(sess.name, "disconnected")

    def _next(self, sess: Session) -> Any:
        """What to push on this session now (called under the lock); None = nothing."""
        if not sess.alive or self.stopping.is_set():
            return "dead"
        if self.done:
            return pb.TaskHeader(kind=pb.TASK_DONE, run_id=self.run_id,
                                 message="run finished"), b""
        for d in self.decoding.values():
            if d.open and d.target == sess.name and d.task_id not in sess.sent:
                sess.sent.add(d.task_id)
                return pb.TaskHeader(kind=pb.TASK_DECODE, run_id=self.run_id, round=d.round,
                                     task_id=d.task_id, members=list(d.members)), d.body
        t = self.task
        if (t is not None and t.open and sess.name in t.participants
                and sess.name not in t.results and t.task_id not in sess.sent):
            sess.sent.add(t.task_id)
            header = pb.TaskHeader(kind=pb.TASK_FIT, run_id=self.run_id, round=t.round,
                                   task_id=t.task_id, config=config_pb(t.plan.configs[sess.name]))
            header.config.dp_count = t.dp_count
            return header, t.body
        return None

    def _check_open(self, name: str, h: pb.UpdateHeader) -> FitTask:
        """The open task this answer belongs to (called under the lock)."""
        t = self.task
        if h.round <= self.completed:
            raise Refused("FAILED_PRECONDITION",
                          f"round {h.round} is already completed (replayed or stale answer); "
                          f"the current round is {self.completed + 1}")
        if t is None or not t.open or h.round != t.round:
            raise Refused("FAILED_PRECONDITION", f"round {h.round} is not open; wait for the next task")
        if h.task_id != t.task_id:
            raise Refused("FAILED_PRECONDITION",
                          "task id does not match the open attempt of this round (stale answer "
                          "after a retry or a server restart); wait for the new task")
        if name not in t.participants:
            raise Refused("PERMISSION_DENIED",
                          f"client {name!r} is not a participant of round {h.round}")
        if name in t.results or name in t.failed:
            raise Refused("ALREADY_EXISTS",
                          f"client {name!r} already answered round {h.round} (replay refused)")
        return t

    def submit(self, name: str, h: pb.UpdateHeader, chunks: Iterator[bytes]) -> pb.SubmitReply:
        """A client's answer: a fit result (or the failure it reports), or a key holder's
        decoded mean. Raises ``Refused`` for anything not expected now."""
        if h.run_id != self.run_id:
            raise Refused("FAILED_PRECONDITION",
                          f"wrong run {h.run_id!r}: this server runs {self.run_id!r}")
        if h.kind == pb.TASK_DECODE:
            return self._decoded(name, h, chunks)
        if h.kind != pb.TASK_FIT:
            raise Refused("INVALID_ARGUMENT",
                          f"answers of kind {pb.TaskKind.Name(h.kind)} are not expected")
        with self.cond:
            task = self._check_open(name, h)
        try:
            body = wire.read_body(chunks, h.body_size, h.body_sha256, self.max_body)
            t_read = time.perf_counter()
            signed = self._signed(name, h, task, body) if self.encrypted and body else None
            payload = self.summer.loads(body) if body else None
            answer = Answer(payload, int(h.num_examples), dict(h.metrics), h.error or None)
            result = accept(self.summer, name, answer, nbytes=len(body),
                            read_s=time.perf_counter() - t_read)
            if task.running is not None and payload is not None:  # summed now, not at the end
                t_add = time.perf_counter()
                task.running.add(name, payload)
                result = replace(result, accept_s=result.accept_s + time.perf_counter() - t_add)
        except wire.BodyError as e:
            raise Refused(e.code, str(e)) from e
        except (ClientError, CryptoError) as e:
            reason = e.reason if isinstance(e, ClientError) else str(e)
            with self.cond:
                if self.task is task and task.open:
                    task.rejected[name] = reason
                    if h.error:
                        task.failed.add(name)
                    self.cond.notify_all()
            event(self.log, "update_rejected", level=logging.WARNING, client=name,
                  round=h.round, reason=reason)
            if isinstance(e, CryptoError):  # another key set: retrying cannot help
                raise Refused("PERMISSION_DENIED",
                              f"update refused: {reason}; this client's key files do not belong "
                              "to this federation: get them from the operator (`hefl keys`)") from e
            if h.error:  # the client reported its own failure: recorded, the client stays
                return pb.SubmitReply(accepted=False, message=f"failure recorded: {reason}")
            raise Refused("INVALID_ARGUMENT", reason) from e
        with self.cond:
            if self._check_open(name, h) is not task:
                raise Refused("FAILED_PRECONDITION", "the round attempt changed")
            task.results[name] = result
            if signed is not None:
                task.signed[name] = signed
            task.rejected.pop(name, None)
            self.cond.notify_all()
        event(self.log, "update_accepted", client=name, round=h.round, bytes=len(body))
        self._note(name, f"answered round {h.round}")
        return pb.SubmitReply(accepted=True, message=f"update for round {h.round} accepted")

    def _signed(self, name: str, h: pb.UpdateHeader, task: FitTask,
                body: bytes) -> pb.SignedUpdate:
        """An encrypted update must carry its sender's signature over this round, attempt,
        model and body (else ``Refused``: the client's identity key is not the registered one)."""
        message = statement(self.run_id, h.round, h.task_id, task.model, digest(body))
        if not verify(self.signers.get(name, ""), message, h.signature):
            reason = (f"the update of {name!r} does not carry {name}'s valid signature for "
                      f"round {h.round}")
            with self.cond:
                if self.task is task and task.open:
                    task.rejected[name] = reason
                    task.failed.add(name)  # final: its identity key is not the registered one
                    self.cond.notify_all()
            event(self.log, "update_rejected", level=logging.WARNING, client=name,
                  round=h.round, reason=reason)
            raise Refused(
                "PERMISSION_DENIED",
                f"{reason}: sign with the identity key `hefl certs` made for {name} "
                f"(clients/{name}.id), whose public key the registry lists")
        return pb.SignedUpdate(client=name, task_id=h.task_id, signature=h.signature,
                               payload=body)

    def _decoded(self, name: str, h: pb.UpdateHeader, chunks: Iterator[bytes]) -> pb.SubmitReply:
        """A key holder's answer: the mean delta (float64) and ``total_weight``, or an error."""
        with self.cond:
            d = self.decoding.get(h.task_id)
            if d is None or not d.open or d.target != name:
                raise Refused("FAILED_PRECONDITION",
                              "no such decode task is waiting for this client (stale or forged)")
        spec = self.summer.spec
        limit = (8 * spec.n_ciphertexts * spec.n_primes * spec.poly_degree + 4096 if d.members
                 else 8 * self.size)
        try:
            body = wire.read_body(chunks, h.body_size, h.body_sha256, limit)
        except wire.BodyError as e:
            raise Refused(e.code, str(e)) from e
        answer = partial = None
        if not h.error and d.members:
            partial = self._partial_answer(name, d, body)
        elif not h.error:
            weight = h.metrics.get("total_weight", float("nan"))
            try:
                mean = wire.vector_from(body, self.size)
            except TransportError as e:
                raise Refused("INVALID_ARGUMENT", str(e)) from e
            if not (np.isfinite(mean).all() and math.isfinite(weight) and weight > 0):
                raise Refused("INVALID_ARGUMENT",
                              "decoded mean or total_weight is not finite and positive")
            answer = (mean, float(weight))
        with self.cond:
            if self.decoding.get(d.task_id) is not d or not d.open:
                raise Refused("FAILED_PRECONDITION", "the decode task was closed")
            d.answer, d.partial, d.error = answer, partial, (h.error or None)
            self.cond.notify_all()
        event(self.log, "decode_answered", round=d.round, key_holder=name,
              refused=bool(h.error))
        return pb.SubmitReply(accepted=True, message="decode answer accepted")

    def _partial_answer(self, name: str, d: DecodeTask, body: bytes) -> Any:
        """A member's partial decryption, checked: its own number, the set asked, this key."""
        from hefl.crypto.threshold import ThresholdPartial

        try:
            part = ThresholdPartial.from_bytes(self.summer.spec, body)
        except (ClientError, CryptoError) as e:
            raise Refused("INVALID_ARGUMENT", f"not a valid partial decryption: {e}") from e
        party = self.committee.index(name) + 1
        if (part.party, part.members, part.key_id) != (party, d.members,
                                                        self.summer.public.key_id):
            raise Refused("INVALID_ARGUMENT",
                          f"the partial decryption is not key holder {name}'s (member {party}) "
                          f"for the set {list(d.members)} under this federation's key")
        return part


__all__ = ["Clock", "Coordinator", "NoKeyHolder", "RealClock", "Refused", "Session"]
