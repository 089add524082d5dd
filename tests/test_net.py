"""Deployment end to end: a server and 3 clients as real processes on 127.0.0.1, TLS on.

The deployed run must be the same computation as the simulation: same seed and split -> the same
final model (within float32 wire rounding of the updates).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hefl.algorithms import fedavgm
from hefl.data.federated import FederatedData
from hefl.data.loaders import load_digits
from hefl.data.partition import dirichlet
from hefl.models.torch import TorchModel
from hefl.models.zoo import mlp
from hefl.net.store import Store
from hefl.net.testing import env, make_demo, spawn_client, spawn_server
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
    # Same kernels on the same CPU, one torch thread on both sides, so CPU-independent; what
    # differs is the plaintext wire format (weighted deltas as float32, 2^-24 relative, ~1e-8
    # on these deltas per round, kept by FedAvgM's momentum across 3 rounds).
    np.testing.assert_allclose(params, ref.params, rtol=0, atol=1e-5)
    assert not np.allclose(params, TorchModel(lambda: mlp(64, 8, 10), seed=0).init_vector())
    # the server log is structured and never carries a token
    log = (demo.root / "server.log").read_text()
    secret = demo.fed.token("c0").read_text().strip().split(":")[1]
    assert secret not in log and '"event": "round_completed"' in log
