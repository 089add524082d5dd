"""The round protocol over the in-memory transport: the real Coordinator and real
FederationClients in one process, no sockets, no sleeps (deadlines on a FakeClock).

Covers stragglers, retries below min_clients, a client whose fit raises, a NaN update, a client
that disconnects mid-round, and simulation == deployment round records for the same seed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hefl.algorithms import fedavg
from hefl.data.federated import FederatedData
from hefl.errors import TransportError
from hefl.models.linear import LogisticRegressionModel
from hefl.net.client import FederationClient
from hefl.net.testing import make_demo, run_in_memory
from hefl.simulation import simulate

LOGREG = {"kind": "logreg", "n_features": 4, "n_classes": 2}


def toy_data(nan_client: int | None = None) -> FederatedData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int64)
    if nan_client is not None:
        x[nan_client * 20 : nan_client * 20 + 3, 2] = np.nan  # three bad rows in one client
    parts = FederatedData.from_indices(x, y, [range(0, 20), range(20, 40), range(40, 60)])
    return FederatedData({f"c{i}": d for i, d in enumerate(parts.train.values())})


def demo_of(tmp_path, data, rounds=2, **server):
    return make_demo(tmp_path, data, model=LOGREG, rounds=rounds, clients_per_round=3,
                     tls=False, server={"min_clients": 2, **server})


def simulated(data, rounds):
    return simulate(LogisticRegressionModel(4, 2), data, fedavg(), rounds=rounds,
                    clients_per_round=3, seed=0)


def comparable(r):
    """A record without its timings (wall and phase times differ from run to run)."""
    d = r.to_dict()
    for k in ("wall_s", "encode_s", "aggregate_s", "decode_s"):
        d.pop(k)
    return d


def test_deployment_records_equal_simulation_records(tmp_path):
    run = run_in_memory(demo_of(tmp_path, toy_data(), rounds=3))
    records, params = run.finish()
    ref = simulated(toy_data(), 3)
    assert [comparable(r) for r in records] == [comparable(r) for r in ref.history.records]
    np.testing.assert_array_equal(params, ref.params)  # same payloads, same order: bit for bit


def test_nan_client_stays_connected_and_is_rejected_each_round_like_simulation(tmp_path):
    run = run_in_memory(demo_of(tmp_path, toy_data(nan_client=1), rounds=3))
    records, params = run.finish()
    ref = simulated(toy_data(nan_client=1), 3)
    assert all("NaN/Inf" in r.rejected["c1"] for r in records)
    assert [comparable(r) for r in records] == [comparable(r) for r in ref.history.records]
    np.testing.assert_array_equal(params, ref.params)
    c1 = run.clients["c1"]
    assert c1.summary.reconnects == 0 and not hasattr(c1, "error")  # never left


class RaisingClient(FederationClient):
    def _prepare(self, join):
        super()._prepare(join)
        if self.name == "c2":
            def broken(params, config):
                raise OSError("disk full on the bank's node")

            self.client.fit = broken


def test_client_whose_fit_raises_reports_it_and_stays(tmp_path):
    run = run_in_memory(demo_of(tmp_path, toy_data(), rounds=2), client_class=RaisingClient)
    records, _ = run.finish()
    assert [r.contributors for r in records] == [2, 2]
    assert all(r.rejected["c2"] == "fit raised OSError: disk full on the bank's node"
               for r in records)
    assert run.clients["c2"].summary.reconnects == 0
    assert run.clients["c2"].summary_result.rounds_trained == 0


class SlowClient(FederationClient):
    """c2's fit blocks until the test releases it."""

    release = threading.Event()
    entered = threading.Event()

    def _fit(self, h, body, transport):
        if self.name == "c2":
            self.entered.set()
            self.release.wait(30)
        super()._fit(h, body, transport)


def test_straggler_is_cut_by_the_round_deadline_on_the_fake_clock(tmp_path):
    SlowClient.release, SlowClient.entered = threading.Event(), threading.Event()
    run = run_in_memory(demo_of(tmp_path, toy_data(), rounds=1, round_timeout_s=60.0),
                        client_class=SlowClient)
    run.wait(lambda c: c.task is not None and len(c.task.results) == 2)
    assert SlowClient.entered.wait(30)  # c2 has its task and is training
    run.advance(59.0)  # not yet: the round waits for c2
    assert run.clock.blocked(run.runner) == 60.0 and run.coordinator.completed == 0
    run.advance(2.0)  # past the deadline: the round closes without c2
    run.wait(lambda c: c.completed == 1)
    SlowClient.release.set()  # c2's late answer arrives after the round closed
    records, params = run.finish()
    assert (records[0].contributors, records[0].selected) == (2, 3)
    assert "straggler" in records[0].rejected["c2"]
    assert run.clients["c2"].summary.refused == 1
    two = FederatedData({k: toy_data().train[k] for k in ("c0", "c1")})
    np.testing.assert_array_equal(params, simulated_two(two))


def simulated_two(data):
    return simulate(LogisticRegressionModel(4, 2), data, fedavg(), rounds=1,
                    clients_per_round=3, seed=0).params


def test_round_below_min_clients_is_retried_until_enough_answer(tmp_path):
    demo = demo_of(tmp_path, toy_data(), rounds=1, min_clients=3, join_timeout_s=5.0,
                   start_timeout_s=5.0, retry_delay_s=1.0)
    run = run_in_memory(demo, {"c0": {}, "c1": {}})  # c2 is not there yet
    run.wait(lambda c: len(c.sessions) == 2)
    run.advance(5.0)  # start timeout: 2 of 3 connected < min_clients -> retry
    run.wait(lambda c: c.retries == 1)
    from hefl.net.client import ClientSettings
    from hefl.net.memory import MemoryTransport
    from hefl.net.wire import Token

    token = Token.parse(demo.fed.token("c2").read_text())
    c2 = FederationClient(ClientSettings(server="memory", data=demo.data["c2"], token=token),
                          connect=lambda: MemoryTransport(run.coordinator, token))
    t = threading.Thread(target=c2.run, daemon=True)
    t.start()
    run.wait(lambda c: len(c.sessions) == 3)
    run.advance(1.0)  # retry delay over: the second attempt has everyone
    records, params = run.finish()
    t.join(30)
    assert records[0].contributors == 3
    np.testing.assert_array_equal(params, simulated(toy_data(), 1).params)


class Vanishing(FederationClient):
    """c1's connection drops in the middle of its first fit."""

    def _fit(self, h, body, transport):
        if self.name == "c1" and not getattr(self, "dropped", False):
            self.dropped = True
            transport.close()
            raise TransportError("network cut")
        super()._fit(h, body, transport)


def test_client_disconnecting_mid_round_is_dropped_then_rejoins(tmp_path):
    run = run_in_memory(demo_of(tmp_path, toy_data(), rounds=2), client_class=Vanishing)
    records, _ = run.finish()
    assert [r.contributors for r in records] == [2, 3]
    assert "disconnected mid-round" in records[0].rejected["c1"]
    assert run.clients["c1"].summary.reconnects == 1


def test_a_second_coordinator_on_the_same_state_dir_is_refused(tmp_path):
    from hefl.errors import StateInUse
    from hefl.net.config import load_config
    from hefl.net.coordinator import Coordinator

    demo = demo_of(tmp_path, toy_data(), rounds=1)
    first = Coordinator(load_config(demo.config))
    try:
        with pytest.raises(StateInUse, match=r"in use by the server at 127\.0\.0\.1:\d+"):
            Coordinator(load_config(demo.config))
    finally:
        first.close()
    Coordinator(load_config(demo.config)).close()  # released: the next server may start


def test_late_client_learns_the_run_finished_and_exits_cleanly(tmp_path):
    from hefl.net.client import ClientSettings
    from hefl.net.memory import MemoryTransport
    from hefl.net.wire import Token

    demo = demo_of(tmp_path, toy_data(), rounds=1, linger_s=30.0)
    run = run_in_memory(demo, {"c0": {}, "c1": {}})  # c2 arrives after the end
    run.wait(lambda c: len(c.sessions) == 2)
    run.advance(60.0)  # start timeout: the round goes ahead with the two that are there
    run.wait(lambda c: c.done)
    token = Token.parse(demo.fed.token("c2").read_text())
    late = FederationClient(ClientSettings(server="memory", data=demo.data["c2"], token=token),
                            connect=lambda: MemoryTransport(run.coordinator, token))
    summary = late.run()  # returns (exit 0), does not retry until give_up_s
    assert summary.run_id == run.coordinator.run_id and summary.rounds_trained == 0
    assert run.clock.blocked(run.runner) == 60.0 + 30.0  # it lingers for late clients...
    run.advance(30.0)  # ...then ends
    records, _ = run.finish()
    assert [r.contributors for r in records] == [2]


def test_extending_rounds_continues_the_finished_run(tmp_path):
    import re

    demo = demo_of(tmp_path, toy_data(), rounds=2)
    first, _ = run_in_memory(demo).finish()
    text = demo.config.read_text()
    demo.config.write_text(re.sub(r"(?m)^rounds = 2$", "rounds = 3", text))
    run = run_in_memory(demo)
    records, params = run.finish()
    assert [r.round for r in records] == [1, 2, 3]  # rounds 1-2 kept, only round 3 trained
    assert [comparable(r) for r in records[:2]] == [comparable(r) for r in first]
    np.testing.assert_array_equal(params, simulated(toy_data(), 3).params)
    log = (demo.root / "server.log").read_text()
    assert "extended from 2 to 3 rounds" in log
