"""DP-FedAvg through the round loop: clipping, Poisson sampling, the fixed denominator, exact
distributed noise under BFV, dropouts, the budget stop and the CLI's ``dp`` object."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from hefl.aggregation import PlainAggregator
from hefl.algorithms import fedavg
from hefl.crypto import make_aggregator
from hefl.errors import ConfigError, KeyCustodyError, NothingTrained
from hefl.privacy import dp
from hefl.simulation import run

logging.getLogger("absl").setLevel(logging.ERROR)


class Push:
    """A client whose update is always ``v`` (it returns ``global + v``)."""

    def __init__(self, v):
        self.v = np.asarray(v, float)

    def fit(self, params, config):
        return params + self.v, 3, {}

    def evaluate(self, params, config):
        return 0.0, 1, {}


def _clients(n, v):
    return {i: Push(v) for i in range(n)}


def test_central_dp_clips_weighs_equally_and_divides_by_the_expected_count():
    v = np.array([3.0, 4.0, 0.0])  # norm 5, clipped to 1
    plan = dp(epsilon=math.inf, clip=1.0).plan(40, 10, 1, size=3)
    res = run(_clients(40, v), np.zeros(3), fedavg(), rounds=1, clients_per_round=10, seed=3,
              privacy=plan)
    rec = res.history.records[0]
    assert 0 < rec.contributors != 10 or rec.contributors == 10  # Poisson: any count
    np.testing.assert_allclose(res.params, rec.contributors * (v / 5.0) / 10.0, rtol=1e-12)
    assert rec.dp_epsilon == math.inf


def test_poisson_sampling_varies_the_count_around_its_mean():
    plan = dp(epsilon=math.inf).plan(200, 20, 30, size=1)
    res = run(_clients(200, [0.1]), np.zeros(1), fedavg(), rounds=30, clients_per_round=20,
              privacy=plan)
    counts = [r.selected for r in res.history]
    assert len(set(counts)) > 3  # not a fixed k
    assert abs(np.mean(counts) - 20) < 5 * math.sqrt(20 * 0.9 / 30)


def test_central_noise_reaches_the_model_with_the_planned_deviation():
    size, k = 2000, 10
    plan = dp(noise_multiplier=2.0, clip=1.0).plan(10, k, 1, size=size)
    res = run(_clients(10, np.zeros(size)), np.zeros(size), fedavg(), rounds=1,
              clients_per_round=k, privacy=plan)
    # everyone is sampled (k = N); the model moved only by noise / k
    std = float(np.std(res.params * k))
    assert abs(std - 2.0) < 5 * 2.0 / math.sqrt(2 * size)


@pytest.mark.slow
def test_bfv_central_equals_plaintext_central_up_to_noise_and_rounding():
    size = 50
    v = np.linspace(-1, 1, size)
    plan = dp(epsilon=math.inf, clip=2.0).plan(30, 10, 2, size=size)
    plain = run(_clients(30, v), np.zeros(size), fedavg(), rounds=2, clients_per_round=10,
                seed=1, privacy=plan)
    agg = make_aggregator("bfv", size, custody="keyholder", seed=0, **plan.aggregator_options())
    bfv = run(_clients(30, v), np.zeros(size), fedavg(), rounds=2, clients_per_round=10,
              seed=1, privacy=plan, aggregator=agg)
    # same samples (same seed); BFV's stochastic rounding errs below clip/Q per value
    assert [r.contributors for r in bfv.history] == [r.contributors for r in plain.history]
    np.testing.assert_allclose(bfv.params, plain.params, atol=2 * 2.0 / (2**15 - 1))


def test_distributed_noise_sums_exactly_under_bfv():
    """Each client's integer update plus its Skellam draw, summed by the server under BFV and
    decrypted by the key holder, equals the integer sum of the same draws exactly."""
    from hefl.crypto.packing import clip_update, quantize
    from hefl.crypto.secure_sum import EncryptingClient
    from hefl.privacy.mechanisms import skellam_noise

    size = 300
    plan = dp(noise_multiplier=1.0, clip=1.0, mode="distributed",
              min_clients=3).plan(6, 6, 1, size=size)
    agg = make_aggregator("bfv", size, custody="keyholder", **plan.aggregator_options())
    spec = agg.spec
    assert spec.dp_mu == pytest.approx(plan.dp_mu) and spec.dp_offset > 0
    rng = np.random.default_rng(5)
    deltas = [rng.normal(size=size) * 0.03 for _ in range(4)]
    payloads, expect = {}, np.zeros(size, np.int64)
    for i, d in enumerate(deltas):
        enc = EncryptingClient(agg.server.public, seed=100 + i, noise_seed=200 + i)
        payloads[i] = enc.encode(i, d, 1.0)
        c, _ = clip_update(d, spec)
        q = quantize(c, spec, np.random.default_rng(100 + i))
        expect += q + skellam_noise(np.random.default_rng(200 + i), size, spec.dp_mu)
    mean, weight = agg.key_holder.decode(agg.server.aggregate(payloads))
    got = np.rint(mean * weight * spec.quant_max / spec.clip).astype(np.int64)
    assert weight == 4
    np.testing.assert_array_equal(got, expect)


def test_dropouts_below_the_planned_count_skip_the_round_and_still_count():
    size = 20
    plan = dp(noise_multiplier=1.0, clip=1.0, mode="distributed",
              min_clients=8).plan(10, 10, 2, size=size)
    agg = make_aggregator("bfv", size, custody="keyholder", min_clients=2,
                          **plan.aggregator_options())
    clients = {i: (_Broken() if i < 4 else Push(np.full(size, 0.01))) for i in range(10)}
    with pytest.raises(NothingTrained) as e:  # 4 of 10 fail: 6 < 8 contributions, every round
        run(clients, np.zeros(size), fedavg(), rounds=2, clients_per_round=10, privacy=plan,
            aggregator=agg)
    res = e.value.result
    assert all(r.skipped and "sized for at least 8" in r.skip_reason for r in res.history)
    assert res.history.records[1].dp_epsilon == pytest.approx(plan.epsilon(2))
    np.testing.assert_array_equal(res.params, np.zeros(size))
    # 9 of 10 answer (above dp_min): the 10 sampled sized their noise for 10, so 9 carry less
    # than planned; the share slot shows it and the round is skipped too
    clients = {i: (_Broken() if i < 1 else Push(np.full(size, 0.01))) for i in range(10)}
    with pytest.raises(NothingTrained) as e:
        run(clients, np.zeros(size), fedavg(), rounds=1, clients_per_round=10, privacy=plan,
            aggregator=agg)
    assert "it is not released" in e.value.result.history.records[0].skip_reason


class _Broken:
    def fit(self, params, config):
        raise RuntimeError("offline")

    def evaluate(self, params, config):
        return 0.0, 1, {}


def test_the_run_stops_before_the_budget_is_exceeded():
    cfg = dp(noise_multiplier=1.5, epsilon=2.0, clip=1.0)
    plan = cfg.plan(100, 10, 100, size=2)
    allowed = max(r for r in range(1, 101) if plan.epsilon(r) <= 2.0)
    res = run(_clients(100, [0.1, 0.1]), np.zeros(2), fedavg(), rounds=100,
              clients_per_round=10, privacy=plan)
    assert len(res.history) == allowed < 100
    assert res.history.records[-1].dp_epsilon <= 2.0
    assert f"round {allowed + 1} would spend epsilon" in res.stopped


def test_schemes_that_would_show_an_unnoised_sum_are_refused():
    plan = dp(epsilon=4.0).plan(20, 5, 3, size=4)
    for custody in ("clients", "threshold"):
        agg = make_aggregator("bfv", 4, custody=custody, **plan.aggregator_options())
        with pytest.raises(ConfigError, match="central DP adds noise"):
            run(_clients(20, [0.1] * 4), np.zeros(4), fedavg(), rounds=3, clients_per_round=5,
                privacy=plan, aggregator=agg)
    dist = dp(epsilon=4.0, mode="distributed")
    for agg in (None, PlainAggregator(4),
                make_aggregator("bfv", 4, custody="keyholder", **plan.aggregator_options())):
        with pytest.raises(ConfigError, match="distributed DP needs the clients' noise"):
            run(_clients(20, [0.1] * 4), np.zeros(4), fedavg(), rounds=3, clients_per_round=5,
                privacy=dist, aggregator=agg)
    with pytest.raises(ConfigError, match="do not apply to CKKS"):
        make_aggregator("ckks", 4, custody="keyholder", dp_mu=10.0, dp_min=2)


def test_a_distributed_client_refuses_a_weight_other_than_one():
    from hefl.errors import UpdateRejected

    plan = dp(noise_multiplier=1.0, mode="distributed", min_clients=2).plan(4, 4, 1, size=4)
    agg = make_aggregator("bfv", 4, custody="keyholder", **plan.aggregator_options())
    with pytest.raises(UpdateRejected, match="weight 1"):
        agg.client.encode("c", np.zeros(4), 7.0)


def test_a_key_holder_refuses_a_sum_below_the_planned_count():
    plan = dp(noise_multiplier=1.0, mode="distributed", min_clients=5).plan(8, 8, 1, size=4)
    agg = make_aggregator("bfv", 4, custody="keyholder", min_clients=2,
                          **plan.aggregator_options())
    pays = {i: agg.client.encode(i, np.zeros(4), 1.0) for i in range(4)}
    with pytest.raises(KeyCustodyError, match="sized for at least 5"):
        agg.key_holder.decode(agg.server.aggregate(pays))


def test_cli_json_carries_the_dp_object(tmp_path):
    from typer.testing import CliRunner

    from hefl.cli import app

    r = CliRunner().invoke(app, ["simulate", "--clients", "30", "-k", "10", "--rounds", "2",
                                 "--partition", "iid", "--dp-epsilon", "8", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output.strip().splitlines()[-1])["dp"]
    assert d["mode"] == "central" and d["rounds"] == 2 and d["epsilon"] <= 8.0
    bad = CliRunner().invoke(app, ["simulate", "--rounds", "1", "--dp-epsilon", "8",
                                   "--dp-mode", "distributed"])
    assert bad.exit_code == 2 and "--he bfv" in bad.output
