"""Per-phase round times (issue 16): encode, aggregate and decode are measured in every round of a
simulation and, on the server's side, of a deployment; they fit inside the round's wall time."""

from __future__ import annotations

import numpy as np
import pytest

from hefl.algorithms import fedavg
from hefl.crypto import make_aggregator
from hefl.models.linear import LogisticRegressionModel
from hefl.simulation import simulate
from tests.test_net_rounds import LOGREG, toy_data


@pytest.mark.parametrize("he", [None, "bfv"])
def test_simulation_records_phase_times_within_the_round(he):
    data = toy_data()
    model = LogisticRegressionModel(4, 2)
    agg = make_aggregator(he, model.spec.size, seed=0) if he else None
    res = simulate(model, data, fedavg(), rounds=3, clients_per_round=3, aggregator=agg)
    for r in res.history:
        phases = (r.encode_s, r.aggregate_s, r.decode_s)
        assert all(p is not None and p > 0 for p in phases), r
        assert sum(phases) <= r.wall_s  # the phases are parts of the round, measured inside it


def test_encrypted_phases_cost_more_than_plaintext_ones():
    data = toy_data()
    model = LogisticRegressionModel(4, 2)
    plain = simulate(model, data, fedavg(), rounds=2, clients_per_round=3)
    enc = simulate(model, data, fedavg(), rounds=2, clients_per_round=3,
                   aggregator=make_aggregator("bfv", model.spec.size, seed=0))
    # BFV encrypts at least one ciphertext per client (tens of microseconds each, at least),
    # where plaintext encoding copies a 10-float vector; decoding decrypts vs divides
    for k in ("encode_s", "decode_s"):
        assert np.median([getattr(r, k) for r in enc.history]) > \
            np.median([getattr(r, k) for r in plain.history])


@pytest.mark.timeout(90)
def test_deployment_records_server_phases_and_status_shows_them(tmp_path):
    from hefl.net.status import render, summarize
    from hefl.net.testing import make_demo, run_in_threads

    demo = make_demo(tmp_path, toy_data(), model=LOGREG, rounds=2, clients_per_round=3,
                     server={"min_clients": 3})
    records, _, _ = run_in_threads(demo)
    for r in records:
        assert r.encode_s is None  # the clients' time is not the server's to measure
        assert r.aggregate_s is not None and r.decode_s is not None
        assert 0 < r.aggregate_s + r.decode_s <= r.wall_s
    text = render(summarize(demo.state))
    assert "aggregate_s=" in text and "decode_s=" in text
