"""Encrypted-ready federated statistics: pooled == federated, selection equal, bad input."""

import math

import numpy as np
import pytest

from hefl.aggregation import PlainAggregator
from hefl.analytics import (
    VariableSpec,
    federated_stats,
    merge_cells,
    pooled_stats,
    select_variables,
    woe_iv,
)
from hefl.data.partition import by_key
from hefl.data.tabular import Table, load_bank, shared_data
from hefl.errors import ConfigError, DataError, RoundError

BANK = shared_data("bank_marketing", "bank-full.csv.gz")


def _table(n=900, seed=0):
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(6, 1.5, n) * rng.choice([-1, 1], n, p=[0.1, 0.9])
    age = rng.integers(18, 90, n)
    color = rng.choice(["red", "green", "blue"], n, p=[0.5, 0.3, 0.2])
    noise = rng.choice(["a", "b"], n)
    logit = 0.04 * (age - 50) + 1.2 * (color == "blue") - 0.5
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    region = rng.choice(["n", "s", "e", "w"], n)
    rows = [[f"{a:.3f}", str(g), c, z, r, t]
            for a, g, c, z, r, t in zip(amount, age, color, noise, region, y, strict=True)]
    return Table.from_rows(["amount", "age", "color", "noise", "region", "y"], rows)


def _spec(t):
    return VariableSpec.from_schema(t, "y", "yes", columns=["amount", "age", "color", "noise"])


def test_hand_computed_moments_and_categorical_iv():
    t = _table()
    st = federated_stats({r: t.take(ix) for r, ix in by_key(t["region"]).items()}, _spec(t))
    age = np.array([float(v) for v in t["age"]])
    y = (t["y"] == "yes").astype(float)
    assert st.n == len(age) and st.positive_rate == pytest.approx(y.mean())
    assert st.variables["age"].mean == pytest.approx(age.mean(), rel=1e-12)
    assert st.variables["age"].var == pytest.approx(age.var(), rel=1e-9)
    assert st.variables["age"].corr == pytest.approx(np.corrcoef(age, y)[0, 1], rel=1e-9)
    # IV of "color" by hand: sum over levels (good share - bad share) * ln(good / bad)
    iv = 0.0
    for level in ("blue", "green", "red"):
        g = ((t["color"] == level) & (y == 0)).sum() / (y == 0).sum()
        b = ((t["color"] == level) & (y == 1)).sum() / (y == 1).sum()
        iv += (g - b) * math.log(g / b)
    assert st.variables["color"].iv == pytest.approx(iv, rel=1e-9)
    assert st.variables["color"].counts == tuple(
        (int(((t["color"] == lv) & (y == 0)).sum()), int(((t["color"] == lv) & (y == 1)).sum()))
        for lv in ("blue", "green", "red"))


def test_federated_equals_pooled_and_selection_matches():
    t = _table(seed=1)
    spec = _spec(t)
    fed = federated_stats({r: t.take(ix) for r, ix in by_key(t["region"]).items()}, spec)
    pooled = pooled_stats(t, spec)
    for name, v in pooled.variables.items():
        f = fed.variables[name]
        assert f.counts == v.counts and f.bins == v.bins
        assert f.iv == pytest.approx(v.iv, rel=1e-9, abs=1e-12)
        if v.kind == "numeric":
            assert f.mean == pytest.approx(v.mean, rel=1e-9)
            assert f.corr == pytest.approx(v.corr, rel=1e-9, abs=1e-12)
    chosen = select_variables(fed, min_iv=0.02)
    assert chosen == select_variables(pooled, min_iv=0.02)
    assert "color" in chosen and "age" in chosen and "noise" not in chosen


class CountingAggregator(PlainAggregator):
    """Any Aggregator works: this one records what the server and key holder are handed."""

    calls: list = []

    def aggregate(self, payloads):
        CountingAggregator.calls.append(("aggregate", len(payloads)))
        return super().aggregate(payloads)

    def decode(self, aggregate):
        CountingAggregator.calls.append(("decode", aggregate.count))
        return super().decode(aggregate)


def test_only_aggregates_are_decoded_through_the_seam():
    t = _table(seed=2)
    parts = {r: t.take(ix) for r, ix in by_key(t["region"]).items()}
    CountingAggregator.calls = []
    federated_stats(parts, _spec(t), CountingAggregator)
    # two rounds (scales, statistics), each: one aggregate of 4 parties, one decode of the sum
    assert CountingAggregator.calls == [("aggregate", 4), ("decode", 4)] * 2


def test_bad_party_data_and_empty_federation():
    t = _table(n=50)
    spec = _spec(t)
    bad = Table({**t.columns, "age": np.array(["x"] * 50)})
    with pytest.raises(DataError, match="'age'"):
        federated_stats({"a": t, "b": bad}, spec)
    with pytest.raises(ConfigError):
        federated_stats({}, spec)
    empty = t.take(np.zeros(0, dtype=np.int64))
    with pytest.raises(RoundError):
        federated_stats({"a": empty}, VariableSpec("y", "yes", (), {"color": ("red",)}))


def test_woe_iv_and_merge_helpers():
    woe, iv = woe_iv(np.array([[30, 10], [70, 10]]))
    np.testing.assert_allclose(woe, [math.log(0.3 / 0.5), math.log(0.7 / 0.5)])
    assert iv == pytest.approx((0.3 - 0.5) * woe[0] + (0.7 - 0.5) * woe[1])
    hist = np.array([[5, 0], [0, 0], [5, 0], [5, 0], [5, 0]])
    assert merge_cells(hist, 2) == [(0, 3), (3, 5)]


@pytest.mark.skipif(not BANK.is_file(), reason=f"bank marketing data not at {BANK}")
def test_bank_by_job_selection_matches_plaintext():
    t = load_bank(BANK)
    t = t.take(np.arange(0, len(t), 3))  # a third of the rows keeps the test fast
    spec = VariableSpec.from_schema(t, "y", "yes")
    fed = federated_stats({j: t.take(ix) for j, ix in by_key(t["job"]).items()}, spec)
    assert len(fed.contributors) == 12
    pooled = pooled_stats(t, spec)
    assert select_variables(fed, 0.1) == select_variables(pooled, 0.1)
    assert fed.iv() == pytest.approx(pooled.iv(), rel=1e-9)


@pytest.mark.parametrize("scheme", ["ckks", "bfv"])
def test_encrypted_aggregation_gives_the_plaintext_selection(scheme):
    from hefl.inference.pipeline import encrypted_aggregator

    t = _table(n=1200, seed=5)
    spec = _spec(t)
    parts = {r: t.take(ix) for r, ix in by_key(t["region"]).items()}
    enc = federated_stats(parts, spec, encrypted_aggregator(clip=1.0, scheme=scheme))
    plain = pooled_stats(t, spec)
    assert select_variables(enc, 0.02) == select_variables(plain, 0.02)
    assert set(enc.contributors) == set(parts)
    tol = 1e-6 if scheme == "ckks" else 2e-3  # BFV quantizes to 16 bits by default
    assert enc.variables["age"].mean == pytest.approx(plain.variables["age"].mean, rel=tol)
    assert enc.iv() == pytest.approx(plain.iv(), rel=tol, abs=tol)
    if scheme == "ckks":  # pooled counts come back exact after rounding
        assert all(enc.variables[k].counts == v.counts for k, v in plain.variables.items())
