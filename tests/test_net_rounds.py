"""Round policy in-process (threads, real gRPC + TLS on loopback): stragglers cut by the round
deadline or the wait fraction, and a model far over gRPC's 4 MB message default."""

from __future__ import annotations

import numpy as np
import pytest

from hefl.algorithms import fedavg
from hefl.data.federated import FederatedData
from hefl.models.torch import TorchModel
from hefl.models.zoo import mlp
from hefl.net import wire
from hefl.net.testing import make_demo, run_in_threads
from hefl.simulation import simulate

LOGREG = {"kind": "logreg", "n_features": 4, "n_classes": 2}


def toy_data(n_features: int = 4, rows: int = 60) -> FederatedData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, n_features)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    third = rows // 3
    return FederatedData.from_indices(x, y, [range(0, third), range(third, 2 * third),
                                             range(2 * third, rows)])


@pytest.mark.timeout(90)
def test_straggler_is_cut_by_the_round_deadline(tmp_path):
    demo = make_demo(tmp_path, toy_data(), model=LOGREG, rounds=2, clients_per_round=3,
                     server={"min_clients": 2, "round_timeout_s": 4.0})
    # Margins of 4 s (honest clients answer in ~0.1 s) and 2 s (the straggler's answer comes at
    # 6 s) hold on a loaded 2-core machine.
    records, _, clients = run_in_threads(demo, {"c0": {}, "c1": {}, "c2": {"fit_delay_s": 6.0}})
    assert [(r.selected, r.contributors) for r in records] == [(3, 2), (3, 2)]
    assert all("straggler" in r.rejected["c2"] for r in records)
    assert clients["c2"].summary.refused >= 1  # its late answer was refused, not counted


@pytest.mark.timeout(90)
def test_wait_fraction_closes_the_round_early(tmp_path):
    demo = make_demo(tmp_path, toy_data(), model=LOGREG, rounds=1, clients_per_round=3,
                     server={"min_clients": 2, "wait_fraction": 0.6, "round_timeout_s": 60.0})
    records, _, _ = run_in_threads(demo, {"c0": {}, "c1": {}, "c2": {"fit_delay_s": 6.0}})
    # without the wait fraction the round would wait for c2's answer (6 s) and count 3
    assert records[0].contributors == 2 and "straggler" in records[0].rejected["c2"]


@pytest.mark.timeout(120)
def test_model_larger_than_grpc_message_limits_streams_in_chunks(tmp_path):
    data = toy_data(n_features=64, rows=12)
    spec = {"kind": "mlp", "n_in": 64, "hidden": 12_000, "n_out": 10, "seed": 0}
    demo = make_demo(tmp_path, data, model=spec, rounds=1, clients_per_round=3,
                     server={"min_clients": 3})
    records, params, _ = run_in_threads(demo)
    model = TorchModel(lambda: mlp(64, 12_000, 10), seed=0)
    assert 8 * model.spec.size > 4 * wire.CHUNK_BYTES  # params body > gRPC's 4 MB default
    assert records[0].upload_bytes / 3 > 4 * wire.CHUNK_BYTES / 2
    ref = simulate(model, data, fedavg(), rounds=1, clients_per_round=3)
    np.testing.assert_allclose(params, ref.params, rtol=0, atol=1e-6)


@pytest.mark.timeout(90)
def test_mutual_tls_run(tmp_path):
    demo = make_demo(tmp_path, toy_data(), model=LOGREG, rounds=2, clients_per_round=3,
                     server={"min_clients": 3}, mtls=True)
    opts = {}
    for n in demo.names:
        cert, key = demo.fed.client_cert(n)
        opts[n] = {"cert": cert, "key": key}
    records, params, _ = run_in_threads(demo, opts)
    assert [r.contributors for r in records] == [3, 3]
    from hefl.models.linear import LogisticRegressionModel

    ref = simulate(LogisticRegressionModel(4, 2), toy_data(), fedavg(), rounds=2,
                   clients_per_round=3)
    np.testing.assert_allclose(params, ref.params, rtol=0, atol=1e-6)


@pytest.mark.timeout(60)
def test_server_logs_why_it_waits_for_a_client_never_started(tmp_path):
    from hefl.net.testing import events, run_in_memory, wait_event

    demo = make_demo(tmp_path, toy_data(), model=LOGREG, rounds=2, clients_per_round=3,
                     server={"min_clients": 2, "start_timeout_s": 60.0, "join_timeout_s": 5.0})
    log = demo.root / "server.log"
    run = run_in_memory(demo, {"c0": {}, "c1": {}})  # c2 is registered but never started
    run.wait(lambda c: c._live("c0") and c._live("c1"))
    wait_event(log, "waiting_for_clients", round=1)
    run.advance(60.0)  # round 1 waits start_timeout_s for c2
    wait_event(log, "waiting_for_clients", round=2)
    run.advance(5.0)  # round 2 waits join_timeout_s
    records, _ = run.finish()
    assert [(r.selected, r.contributors) for r in records] == [(3, 2), (3, 2)]
    waits = {w["round"]: w for w in events(log, "waiting_for_clients")}
    assert all("c2" in w["absent"] for w in waits.values())
    assert [(w["seconds"], w["setting"]) for w in waits.values()] == [
        (60.0, "[server] start_timeout_s"), (5.0, "[server] join_timeout_s")]
