"""Core contracts: flat vectors, the textbook FedAvg example, algorithms, partitions."""

import numpy as np
import pytest

import hefl
import hefl.errors
from hefl.aggregation import PlainAggregator, PlainPayload, check_update
from hefl.algorithms import make_algorithm
from hefl.client import FitRes
from hefl.data import dirichlet, iid
from hefl.errors import ConfigError, ParamsError, RoundError, UpdateRejected
from hefl.params import ParamSpec
from hefl.rounds import client_payload


class MeanClient:
    """Flower-style user client: its local model is the mean of its data."""

    def __init__(self, data):
        self.data = np.asarray(data, float)

    def fit(self, params, config):
        return np.array([self.data.mean()]), len(self.data), {}

    def evaluate(self, params, config):
        return float(((self.data - params[0]) ** 2).mean()), len(self.data), {}


def test_textbook_fedavg_three_devices():
    clients = {0: MeanClient([1, 2]), 1: MeanClient([3, 4]), 2: MeanClient([5, 6])}
    res = hefl.run(clients, np.zeros(1), hefl.fedavg(), rounds=1, clients_per_round=3)
    # local means 1.5, 3.5, 5.5 -> (1.5*2 + 3.5*2 + 5.5*2) / 6 = 3.5 = mean of all data
    assert res.params[0] == pytest.approx(3.5)
    assert res.history.records[0].contributors == 3


def test_weighted_by_sample_count():
    clients = {"a": MeanClient([0.0]), "b": MeanClient([3.0, 3.0, 3.0])}
    res = hefl.run(clients, np.zeros(1), hefl.fedavg(), rounds=1, clients_per_round=2)
    assert res.params[0] == pytest.approx(9.0 / 4)


def test_params_round_trip_exact_and_sum_contract():
    rng = np.random.default_rng(0)
    a = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }
    b = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }
    spec = ParamSpec.of(a)
    back = spec.unflatten(spec.flatten(a))
    for k in a:
        assert back[k].dtype == a[k].dtype and np.array_equal(back[k], a[k])
    summed = spec.unflatten(spec.flatten(a) + spec.flatten(b))
    for k in a:
        np.testing.assert_allclose(summed[k], a[k] + b[k], rtol=1e-6)


def test_params_shape_mismatch_is_clear():
    spec = ParamSpec.of({"w": np.zeros((2, 2))})
    with pytest.raises(ParamsError, match="shape"):
        spec.flatten({"w": np.zeros((3, 2))})
    with pytest.raises(ParamsError, match="missing"):
        spec.flatten({"v": np.zeros((2, 2))})
    with pytest.raises(ParamsError, match="expected \\(4,\\)"):
        spec.unflatten(np.zeros(5))


def test_nan_update_rejected_round_goes_on():
    class Bad(MeanClient):
        def fit(self, params, config):
            return np.array([np.nan]), 2, {}

    clients = {0: MeanClient([1, 2]), 1: Bad([0, 0]), 2: MeanClient([5, 6])}
    res = hefl.run(clients, np.zeros(1), hefl.fedavg(), rounds=1, clients_per_round=3)
    rec = res.history.records[0]
    assert res.params[0] == pytest.approx(3.5)
    assert rec.contributors == 2 and "NaN" in rec.rejected["1"]


def test_wrong_shape_and_raising_client_rejected():
    class WrongShape(MeanClient):
        def fit(self, params, config):
            return np.zeros(3), 2, {}

    class Crashes(MeanClient):
        def fit(self, params, config):
            raise RuntimeError("disk full")

    clients = {0: MeanClient([1, 2]), 1: WrongShape([0]), 2: Crashes([0])}
    res = hefl.run(clients, np.zeros(1), hefl.fedavg(), rounds=1, clients_per_round=3)
    rec = res.history.records[0]
    assert res.params[0] == pytest.approx(1.5)
    assert "shape" in rec.rejected["1"] and "disk full" in rec.rejected["2"]


def test_round_with_no_usable_update_keeps_model():
    class Empty(MeanClient):
        def fit(self, params, config):
            return params, 0, {}

    class Raises(MeanClient):
        def fit(self, params, config):
            raise OSError("disk full")

    clients = {0: Empty([]), 1: Raises([]), 2: MeanClient([4.0])}
    # seed 2 samples client 0, then 1, then 2: two rounds with nothing usable, then one
    res = hefl.run(clients, np.ones(1), hefl.fedavg(), rounds=3, clients_per_round=1, seed=2)
    assert [r.skipped for r in res.history] == [True, True, False]
    assert all("no usable client updates" in r.skip_reason for r in res.history.records[:2])
    assert res.history.records[1].rejected == {"1": "fit raised OSError: disk full"}
    assert res.params[0] == 4.0
    # every round skipped: the run says so, names the reasons, and keeps what it did
    with pytest.raises(hefl.errors.NothingTrained, match="all 2 round.*disk full") as e:
        hefl.run({0: Raises([])}, np.ones(1), hefl.fedavg(), rounds=2, clients_per_round=1)
    kept = e.value.result
    assert kept.params[0] == 1.0 and all(r.skipped for r in kept.history)
    assert kept.history.records[0].rejected == {"0": "fit raised OSError: disk full"}


def test_flower_style_client_reads_config_by_key():
    seen = {}

    class Flowerish(MeanClient):
        def fit(self, params, config):
            seen.update(lr=config["lr"], epochs=config["local_epochs"],
                        rnd=config["server_round"], mom=config.get("momentum", 0.9))
            return super().fit(params, config)

    hefl.run({0: Flowerish([2.0])}, np.zeros(1), hefl.fedavg(client_lr=0.3, epochs=2),
             rounds=1, clients_per_round=1)
    assert seen == {"lr": 0.3, "epochs": 2, "rnd": 1, "mom": 0.9}
    cfg = hefl.FitConfig(round=1, lr=0.1, epochs=1, batch_size=8)
    assert dict(cfg)["batch_size"] == 8 and "learning_rate" in cfg
    with pytest.raises(KeyError, match="Flower names"):
        cfg["momentum"]


def test_zero_clients_per_round_and_no_clients_are_config_errors():
    with pytest.raises(ConfigError, match="clients per round"):
        hefl.run({0: MeanClient([1])}, np.zeros(1), hefl.fedavg(), rounds=1, clients_per_round=0)
    with pytest.raises(ConfigError, match="no clients"):
        hefl.run({}, np.zeros(1), hefl.fedavg(), rounds=1, clients_per_round=1)


def test_mean_from_empty_aggregate_raises():
    agg = PlainAggregator(2)
    with pytest.raises(RoundError, match="no usable"):
        agg.decode(agg.aggregate({}))


def test_unknown_algorithm_lists_choices():
    with pytest.raises(ConfigError, match="fedadam"):
        make_algorithm("fedsgdx")


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
)
def test_server_optimizers_move_towards_delta(name):
    algo = make_algorithm(name, server_lr=0.1)
    p = np.zeros(4)
    state = algo.server.init(p)
    delta = np.array([1.0, -1.0, 0.5, 0.0])
    new, state = algo.server.apply(p, delta, state)
    assert np.all(np.sign(new) == np.sign(delta))


def test_fedadam_matches_reddi_update():
    algo = hefl.fedadam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    p = np.array([1.0])
    s = algo.server.init(p)
    new, (m, v) = algo.server.apply(p, np.array([2.0]), s)
    m_ref = 0.1 * 2.0
    v_ref = 0.99 * 1e-6 + 0.01 * 4.0
    assert m[0] == pytest.approx(m_ref) and v[0] == pytest.approx(v_ref)
    assert new[0] == pytest.approx(1.0 + 0.1 * m_ref / (np.sqrt(v_ref) + 1e-3))


def test_dirichlet_is_w1_procedure_and_deterministic():
    y = np.repeat(np.arange(10), 50)
    parts = dirichlet(y, 20, 0.5, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))
    again = dirichlet(y, 20, 0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    # first class, first client: the hand-written W1 steps
    rng = np.random.default_rng(0)
    idx = np.flatnonzero(y == 0)
    rng.shuffle(idx)
    p = rng.dirichlet(0.5 * np.ones(20))
    first = np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])[0]
    assert np.array_equal(parts[0][: len(first)], first)


def test_iid_partition_covers_all():
    parts = iid(103, 10, seed=1)
    assert sum(map(len, parts)) == 103 and max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ConfigError):
        iid(10, 0)


def test_plain_payload_wire_round_trip_and_truncation():
    from hefl.errors import UpdateRejected

    agg = PlainAggregator(5)
    p = agg.encode("c", np.arange(5.0), 2.0)
    back = agg.loads(agg.dumps(p))
    assert back.weight == 2.0 and np.allclose(back.weighted_delta, p.weighted_delta)
    assert len(agg.dumps(p)) == agg.nbytes(p)
    with pytest.raises(UpdateRejected, match="truncated"):
        agg.loads(agg.dumps(p)[:-3])


def test_plain_aggregate_checks_every_payload_and_sums_the_rest_exactly():
    """aggregate validates values with one check over the sum; a bad payload anywhere is still
    named with check_update's reason, and the others sum as if it had never been sent."""
    rng = np.random.default_rng(0)
    agg = PlainAggregator(4)
    good = {c: agg.encode(c, rng.normal(size=4), float(c + 1)) for c in range(5)}
    f32 = PlainPayload(rng.normal(size=4).astype(np.float32), 2.0)
    clean = agg.aggregate({**good, "f32": f32})
    assert clean.contributors == (0, 1, 2, 3, 4, "f32") and not clean.rejected
    expected = sum(p.weighted_delta for p in good.values()) + f32.weighted_delta.astype(float)
    assert np.array_equal(clean.payload.weighted_delta, expected)
    bad = {
        "nan": PlainPayload(np.array([0.0, np.nan, 1.0, np.inf]), 1.0),
        "inf_and_negative_weight": PlainPayload(np.full(4, np.inf), -1.0),
        "negative_weight": PlainPayload(np.ones(4), -2.0),
        "shape": PlainPayload(np.ones(3), 1.0),
        "ints": PlainPayload(np.ones(4, dtype=int), 1.0),
        "not_a_payload": np.ones(4),
    }
    for name, p in bad.items():
        mixed = {0: good[0], name: p, 1: good[1]}
        out = agg.aggregate(mixed)
        assert out.contributors == (0, 1)
        ref = agg.aggregate({0: good[0], 1: good[1]})
        assert np.array_equal(out.payload.weighted_delta, ref.payload.weighted_delta)
        assert out.payload.weight == ref.payload.weight == 3.0
        if isinstance(p, PlainPayload):
            with pytest.raises(UpdateRejected) as e:
                check_update(name, p.weighted_delta, 4, p.weight)
            assert out.rejected == {name: e.value.reason}
        else:
            assert "expected a plaintext payload" in out.rejected[name]
    assert "2 NaN/Inf" in agg.aggregate({"nan": bad["nan"]}).rejected["nan"]
    assert "NaN/Inf" in agg.aggregate({"x": bad["inf_and_negative_weight"]}).rejected["x"]


def test_plain_aggregate_finite_updates_whose_sum_overflows_are_kept():
    agg = PlainAggregator(2)
    big = {c: PlainPayload(np.array([1e308, 1.0]), 1.0) for c in range(2)}
    with pytest.warns(RuntimeWarning, match="overflow"):  # as numpy warns for any such sum
        out = agg.aggregate(big)
    assert out.contributors == (0, 1) and not out.rejected
    assert np.isinf(out.payload.weighted_delta[0]) and out.payload.weighted_delta[1] == 2.0


def test_client_payload_float32_params_delta_in_float64():
    agg = PlainAggregator(3)
    g = np.array([0.1, -0.2, 0.3])
    p32 = np.array([1.1, 2.2, 3.3], dtype=np.float32)
    a = client_payload(agg, 0, g, FitRes(p32, 2, {}))
    b = client_payload(agg, 0, g, FitRes(p32.astype(np.float64), 2, {}))
    c = client_payload(agg, 0, g, FitRes([1, 2, 3], 2, {}))
    assert a.weighted_delta.dtype == np.float64
    assert np.array_equal(a.weighted_delta, b.weighted_delta)
    assert np.array_equal(c.weighted_delta, 2 * (np.array([1.0, 2.0, 3.0]) - g))


def test_history_plot_has_a_panel_per_question_and_integer_rounds():
    from hefl.history import History
    from hefl.rounds import RoundRecord

    recs = [RoundRecord(r, 10, 9 - r % 2, 9.0, 1.0 / r, {"test_accuracy": 0.5 + r / 10},
                        upload_bytes=4_000_000 * r) for r in (1, 2, 3)]
    fig = History(recs).figure("digits: fedavg")
    shown = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in shown] == ["test accuracy", "loss", "participants",
                                              "upload per round"]
    for ax in shown:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ax.get_title()
    assert list(shown[3].lines[0].get_ydata()) == [4.0, 8.0, 12.0]  # MB per round
    dp = [RoundRecord(**{**r.to_dict(), "dp_epsilon": 0.1 * r.round}) for r in recs]
    titles = [a.get_title() for a in History(dp).figure().axes if a.get_visible()]
    assert titles[-1] == "privacy budget spent"
