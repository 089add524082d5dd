"""Deployment end to end: a server and 3 clients as real processes on 127.0.0.1, TLS on.

The deployed run must be the same computation as the simulation: same seed and split -> the same
final model (within float32 wire rounding of the updates).
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from hefl.algorithms import fedavg, fedavgm
from hefl.data.federated import FederatedData
from hefl.data.loaders import load_digits
from hefl.data.partition import dirichlet
from hefl.models.torch import TorchModel
from hefl.models.zoo import mlp
from hefl.net.store import Store
from hefl.net.testing import env, make_demo, spawn_client, spawn_server, wait_event
from hefl.simulation import simulate


def small_digits(n_clients: int = 3, take: int = 300) -> FederatedData:
    d = load_digits(0)
    x, y = d.x_train[:take], d.y_train[:take]
    return FederatedData.from_indices(x, y, dirichlet(y, n_clients, 0.5, 0))


def final_params(state) -> tuple[str, np.ndarray, list[int]]:
    s = Store(state, readonly=True)
    try:
        run = s.runs()[0]
        last, params, _ = s.resume_point(run.run_id)
        return run.status, params, s.completed_rounds(run.run_id)
    finally:
        s.close()


def wait_all(procs, timeout=90):
    return [p.wait(timeout) for p in procs]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_deployed_run_equals_simulation_and_refuses_strangers(tmp_path):
    data = small_digits()
    model = {"kind": "mlp", "n_in": 64, "hidden": 8, "n_out": 10, "seed": 0}
    algo = {"name": "fedavgm", "client_lr": 0.05, "server_lr": 1.0, "momentum": 0.5}
    demo = make_demo(tmp_path, data, model=model, rounds=3, clients_per_round=2,
                     algorithm=algo, server={"min_clients": 2})
    server = spawn_server(demo)
    clients = [spawn_client(demo, n) for n in demo.names]
    wait_event(demo.state / "server.log", "listening", timeout=60)
    with socket.create_connection(("127.0.0.1", int(demo.address.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not TLS: a failed handshake
        s.recv(100)
    stranger = subprocess.run(
        [sys.executable, "-m", "hefl.cli", "client", "--server", demo.address,
         "--data", str(demo.data["c0"]), "--token", "mallory:" + "x" * 32,
         "--ca", str(demo.fed.ca), "--give-up-after", "60"],
        env=env(), capture_output=True, text=True, timeout=90,
    )
    assert wait_all([server, *clients]) == [0, 0, 0, 0]
    assert stranger.returncode == 2
    assert "unknown client 'mallory'" in stranger.stderr

    status, params, rounds = final_params(demo.state)
    assert status == "finished" and rounds == [1, 2, 3]
    ref = simulate(TorchModel(lambda: mlp(64, 8, 10), seed=0), data,
                   fedavgm(client_lr=0.05, server_lr=1.0, momentum=0.5),
                   rounds=3, clients_per_round=2, seed=0)
    # Same kernels on the same CPU, one torch thread on both sides, an exact (float64) wire
    # format, the same summation order: the deployed model is the simulated one, bit for bit.
    np.testing.assert_array_equal(params, ref.params)
    assert not np.allclose(params, TorchModel(lambda: mlp(64, 8, 10), seed=0).init_vector())
    # the server log is structured and never carries a token
    log = (demo.root / "server.log").read_text()
    secret = demo.fed.token("c0").read_text().strip().split(":")[1]
    assert secret not in log and '"event": "round_completed"' in log
    assert "Handshake failed" not in log  # gRPC's own INFO lines stay out of the JSON log


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_client_with_nan_data_stays_in_a_real_deployment_like_simulation(tmp_path):
    """CLI processes, TLS, three clients; c1's data file holds NaN features. c1 trains, its
    update is NaN, it reports nothing but the reason, and stays connected every round; each round
    records its rejection; the final model is hefl.simulate's with the same data, bit for bit."""
    from hefl.models.linear import LogisticRegressionModel
    from hefl.simulation import simulate

    data = small_digits()
    names = list(data.ids)
    bad = data.train[names[1]]
    bad.x[:4, 10] = np.nan
    data = FederatedData({f"c{i}": data.train[k] for i, k in enumerate(names)})
    model = {"kind": "logreg", "n_features": 64, "n_classes": 10}
    demo = make_demo(tmp_path, data, model=model, rounds=3, clients_per_round=3,
                     server={"min_clients": 2})
    procs = [spawn_server(demo), *(spawn_client(demo, n) for n in demo.names)]
    assert wait_all(procs) == [0, 0, 0, 0]
    s = Store(demo.state, readonly=True)
    try:
        run = s.runs()[0]
        records = s.records(run.run_id)
        params = s.resume_point(run.run_id)[1]
    finally:
        s.close()
    assert run.status == "finished" and [r.contributors for r in records] == [2, 2, 2]
    assert all("NaN/Inf" in r.rejected["c1"] for r in records)
    c1 = (demo.root / "client-c1.log").read_text()
    # joined once (before the server listened it may have retried to connect), never left
    assert c1.count('"event": "joined"') == 1 and c1.count('"event": "fit_failed"') == 3
    ref = simulate(LogisticRegressionModel(64, 10), data, fedavg(), rounds=3,
                   clients_per_round=3, seed=0)
    assert [r.rejected for r in ref.history.records] == [r.rejected for r in records]
    np.testing.assert_array_equal(params, ref.params)
