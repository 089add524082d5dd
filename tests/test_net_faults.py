"""Faults with real processes on 127.0.0.1 (TLS on): kill -9 of the server mid-round, a client
killed mid-round (dropped when min_clients is still met, round retried when it is not), rejoin.

Whatever happens, every round is completed exactly once and, because a retried or resumed round
is recomputed from the same checkpoint, seed and configs, the final model equals the simulation.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from hefl.algorithms import make_algorithm
from hefl.data.federated import FederatedData
from hefl.data.loaders import load_digits
from hefl.data.partition import dirichlet
from hefl.models.linear import LogisticRegressionModel
from hefl.net.status import summarize
from hefl.net.store import Store
from hefl.net.testing import events, make_demo, spawn_client, spawn_server, wait_event
from hefl.simulation import simulate

MODEL = {"kind": "logreg", "n_features": 64, "n_classes": 10}
ALGO = {"name": "fedadam", "client_lr": 0.05, "server_lr": 0.05}


def small_digits(n_clients: int = 3, take: int = 240) -> FederatedData:
    d = load_digits(0)
    x, y = d.x_train[:take], d.y_train[:take]
    return FederatedData.from_indices(x, y, dirichlet(y, n_clients, 0.5, 0))


def simulated(data: FederatedData, rounds: int) -> np.ndarray:
    algo = make_algorithm(ALGO["name"], client_lr=0.05, server_lr=0.05)
    return simulate(LogisticRegressionModel(64, 10), data, algo, rounds=rounds,
                    clients_per_round=3, seed=0).params


def stored(state):
    s = Store(state, readonly=True)
    try:
        run = s.runs()[0]
        return run.status, s.resume_point(run.run_id)[1], s.records(run.run_id)
    finally:
        s.close()


def finish(procs, timeout=120):
    try:
        return [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_server_kill_9_mid_round_resumes_without_losing_or_repeating_rounds(tmp_path):
    data = small_digits()
    rounds = 5
    demo = make_demo(tmp_path, data, model=MODEL, algorithm=ALGO, rounds=rounds,
                     clients_per_round=3, server={"min_clients": 3})
    log = demo.state / "server.log"
    server = spawn_server(demo)
    clients = [spawn_client(demo, n, "--fit-delay", "0.6") for n in demo.names]
    try:
        wait_event(log, "round_started", round=3, timeout=90)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        _, _, before = stored(demo.state)
        done_before = [r.round for r in before]
        assert done_before == list(range(1, len(done_before) + 1)) and len(done_before) >= 2
        assert len(done_before) < rounds  # killed mid-run
        server = spawn_server(demo, tag="-restarted")  # the same command
        assert finish([server, *clients]) == [0] * 4
    finally:
        finish([server, *clients], timeout=1)
    status, params, records = stored(demo.state)
    assert status == "finished"
    assert [r.round for r in records] == list(range(1, rounds + 1))
    completed = [e["round"] for e in events(log, "round_completed")]
    assert sorted(completed) == list(range(1, rounds + 1))  # none repeated across both lives
    resumed = events(log, "resumed")
    assert resumed and resumed[0]["last_completed_round"] == len(done_before)
    np.testing.assert_allclose(params, simulated(data, rounds), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_client_killed_mid_round_is_dropped_then_rejoins(tmp_path):
    data = small_digits()
    demo = make_demo(tmp_path, data, model=MODEL, algorithm=ALGO, rounds=5, clients_per_round=3,
                     server={"min_clients": 2, "join_timeout_s": 20.0})
    log = demo.state / "server.log"
    server = spawn_server(demo)
    fast = [spawn_client(demo, n, "--fit-delay", "0.3") for n in demo.names[:2]]
    victim = spawn_client(demo, "c2", "--fit-delay", "1.5")
    try:
        wait_event(log, "round_started", round=2, timeout=90)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        wait_event(log, "round_completed", round=2, timeout=60)
        live = summarize(demo.state)["runs"][0]  # hefl status on a live server (read-only)
        assert live["status"] == "running" and live["rounds_completed"] >= 2
        victim = spawn_client(demo, "c2")  # rejoins between rounds
        assert finish([server, *fast, victim]) == [0] * 4
    finally:
        finish([server, *fast, victim], timeout=1)
    status, _, records = stored(demo.state)
    assert status == "finished" and [r.round for r in records] == [1, 2, 3, 4, 5]
    r2 = records[1]
    assert (r2.selected, r2.contributors) == (3, 2)
    assert "disconnected mid-round" in r2.rejected["c2"]
    assert records[0].contributors == 3 and records[-1].contributors == 3  # back after rejoin


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_round_below_min_clients_is_retried_and_result_unchanged(tmp_path):
    data = small_digits()
    demo = make_demo(tmp_path, data, model=MODEL, algorithm=ALGO, rounds=3, clients_per_round=3,
                     server={"min_clients": 3, "join_timeout_s": 20.0, "retry_delay_s": 0.2})
    log = demo.state / "server.log"
    server = spawn_server(demo)
    fast = [spawn_client(demo, n) for n in demo.names[:2]]
    victim = spawn_client(demo, "c2", "--fit-delay", "1.5")
    try:
        wait_event(log, "round_started", round=2, timeout=90)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        wait_event(log, "round_retry", round=2, attempt=1, timeout=60)
        victim = spawn_client(demo, "c2")
        assert finish([server, *fast, victim]) == [0] * 4
    finally:
        finish([server, *fast, victim], timeout=1)
    status, params, records = stored(demo.state)
    assert status == "finished" and [r.contributors for r in records] == [3, 3, 3]
    (attempt,) = [e["attempt"] for e in events(log, "round_completed") if e["round"] == 2]
    assert attempt >= 2  # the first attempt was abandoned, the round completed exactly once
    np.testing.assert_allclose(params, simulated(data, 3), rtol=0, atol=1e-5)


@pytest.mark.timeout(120)
def test_sigterm_stops_cleanly_and_keeps_state(tmp_path):
    demo = make_demo(tmp_path, small_digits(), model=MODEL, algorithm=ALGO, rounds=2,
                     clients_per_round=3, server={"min_clients": 3, "start_timeout_s": 600.0})
    server = spawn_server(demo)
    try:
        wait_event(demo.state / "server.log", "run_started", timeout=90)
        server.send_signal(signal.SIGTERM)  # waiting for clients: must not take 600 s
        assert server.wait(30) == 0
    finally:
        finish([server], timeout=1)
    assert "run the same command to resume" in (tmp_path / "server.log").read_text()
    status, _, records = stored(demo.state)
    assert status == "running" and records == []
