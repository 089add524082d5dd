"""DP accounting, noise and clipping (hefl.privacy): each checked against an independent
computation (dp-accounting called directly, exact Rényi divergences, chi-square bounds)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from hefl.errors import ConfigError
from hefl.privacy import dp
from hefl.privacy.accounting import (
    SKELLAM_ORDERS,
    Event,
    epsilon,
    poisson_subsampled_rdp,
    skellam_rdp,
)
from hefl.privacy.mechanisms import clip_l2, gaussian_noise, skellam_noise, skellam_tail

logging.getLogger("absl").setLevel(logging.ERROR)


def _dp_accounting_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,k,rounds", [(1.0, 100, 50), (2.5, 10, 20), (0.8, 1000, 5)])
def test_gaussian_epsilon_is_dp_accountings(z, k, rounds):
    ev = Event("gaussian", z, 1000, k)
    expect = _dp_accounting_epsilon(z, k / 1000, rounds, 1e-5) if k < 1000 else None
    if expect is None:  # everyone every round: the plain Gaussian composed
        import dp_accounting
        from dp_accounting import rdp

        acc = rdp.RdpAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
        expect = acc.get_epsilon(1e-5)
    assert epsilon(ev, rounds, 1e-5) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("z,q", [(0.7, 0.1), (1.0, 0.01), (3.0, 0.5)])
def test_subsampling_bound_equals_the_sampled_gaussian_for_a_gaussian_curve(z, q):
    """Applied to the Gaussian's curve a/(2 z^2), the binomial bound must be Mironov et al.'s
    exact sampled-Gaussian RDP, which dp-accounting computes by its own code."""
    from dp_accounting.rdp.rdp_privacy_accountant import (
        _compute_rdp_poisson_subsampled_gaussian,
    )

    orders = (2, 3, 4, 8, 16, 32, 64)
    ours = poisson_subsampled_rdp(lambda a: a / (2 * z * z), q, orders)
    theirs = _compute_rdp_poisson_subsampled_gaussian(q, z, orders)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    # Zhu & Wang's looser general form is never below it
    assert np.all(poisson_subsampled_rdp(lambda a: a / (2 * z * z), q, orders, 3.0) >= ours)


def _renyi(lp: np.ndarray, lr: np.ndarray, a: int) -> float:
    """D_a(P || R) from log-pmfs on a common support."""
    from scipy.special import logsumexp

    m = np.isfinite(lp) & np.isfinite(lr)
    return float(logsumexp(a * lp[m] + (1 - a) * lr[m]) / (a - 1))


@pytest.mark.parametrize("mu,shift", [(50.0, 1), (200.0, 3), (1000.0, 10)])
def test_skellam_rdp_bounds_the_exact_divergence(mu, shift):
    """Theorem 3.5's bound holds for the exact Rényi divergence of Sk(mu) and its shift,
    computed from the Skellam pmf, and is tight to within its small second term."""
    from scipy.stats import skellam

    x = np.arange(-int(25 * math.sqrt(mu)) - shift, int(25 * math.sqrt(mu)) + shift + 1)
    p, r = skellam.logpmf(x, mu, mu), skellam.logpmf(x - shift, mu, mu)
    for a in (2, 4, 8, 16):
        exact = max(_renyi(p, r, a), _renyi(r, p, a))
        bound = float(skellam_rdp(np.array([a]), mu, shift, shift)[0])
        assert exact <= bound * (1 + 1e-9)
        assert exact >= a * shift**2 / (4 * mu) * 0.9  # the Gaussian-like term is reached


def test_skellam_epsilon_approaches_the_gaussian_for_fine_quantization():
    q, l2 = 2**15 - 1 + math.sqrt(9610), 0.0
    l2 = q
    ev_s = Event("skellam", 1.2, 1000, 100, l2, min(l2 * l2, math.sqrt(9610) * l2))
    ev_g = Event("gaussian", 1.2, 1000, 100)
    assert epsilon(ev_s, 50, 1e-5) == pytest.approx(epsilon(ev_g, 50, 1e-5), rel=0.02)
    assert epsilon(ev_s, 50, 1e-5) >= epsilon(ev_g, 50, 1e-5) * (1 - 0.01)
    assert max(SKELLAM_ORDERS) >= 128


def test_calibration_hits_the_target_and_epsilon_grows_with_rounds():
    p = dp(epsilon=4.0, delta=1e-5).plan(1000, 100, 50, size=100)
    assert p.epsilon(50) <= 4.0
    assert p.epsilon(50) > 4.0 * 0.99  # the smallest noise that fits, not any noise
    spent = [p.epsilon(r) for r in (1, 10, 25, 50)]
    assert spent == sorted(spent) and spent[0] > 0
    less = dp(epsilon=8.0, delta=1e-5).plan(1000, 100, 50, size=100)
    assert less.noise_multiplier < p.noise_multiplier
    assert dp(epsilon=math.inf).plan(1000, 100, 50, 100).noise_multiplier == 0.0


def test_json_lets_an_outside_script_recompute_epsilon():
    d = dp(epsilon=2.0, delta=1e-5, clip=0.5).plan(500, 20, 30, size=10).to_json()
    assert {"epsilon", "delta", "noise_multiplier", "clip", "mode", "rounds",
            "clients_per_round", "num_clients", "sampling", "neighboring",
            "accountant"} <= set(d)
    assert (d["sampling"], d["neighboring"], d["accountant"]) == ("poisson", "add_remove", "rdp")
    again = _dp_accounting_epsilon(d["noise_multiplier"], d["clients_per_round"] / d["num_clients"],
                                   d["rounds"], d["delta"])
    assert again == pytest.approx(d["epsilon"], rel=0.01)


def test_bad_configs_say_what_to_do():
    with pytest.raises(ConfigError, match="epsilon or a noise multiplier"):
        dp()
    with pytest.raises(ConfigError, match="mode"):
        dp(epsilon=1, mode="local")
    with pytest.raises(ConfigError, match="delta"):
        dp(epsilon=1, delta=0)
    with pytest.raises(ConfigError, match="clip"):
        dp(epsilon=1, clip=-1)
    with pytest.raises(ConfigError, match="raise epsilon"):
        dp(epsilon=1e-4).plan(10, 10, 1000, 5)


def test_clip_bounds_each_contribution():
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        x = rng.normal(size=1000) * scale
        c = clip_l2(x, 1.0)
        assert np.linalg.norm(c) <= 1.0 * (1 + 1e-12)
        if np.linalg.norm(x) <= 1.0:
            np.testing.assert_array_equal(c, x)
        else:
            np.testing.assert_allclose(c / np.linalg.norm(c), x / np.linalg.norm(x))


def _var_within(samples: np.ndarray, var: float) -> None:
    """Sample variance within 5 standard errors of ``var`` (normal-ish tails: se =
    var * sqrt(2 / (n - 1)))."""
    n = samples.size
    assert abs(samples.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (n - 1))
    assert abs(samples.mean()) < 5 * math.sqrt(var / n)


@pytest.mark.parametrize("mu", [0.5, 30.0, 4e6])
def test_skellam_noise_has_the_configured_variance(mu):
    x = skellam_noise(np.random.default_rng(1), 200_000, mu)
    assert x.dtype == np.int64
    _var_within(x.astype(np.float64), 2 * mu)


def test_gaussian_noise_has_the_configured_variance():
    _var_within(gaussian_noise(np.random.default_rng(2), 200_000, 3.5), 3.5**2)
    assert not gaussian_noise(np.random.default_rng(2), 5, 0.0).any()


def test_skellam_tail_bound_holds():
    from scipy.stats import skellam

    for lam in (10.0, 1e4, 1e8):
        t = skellam_tail(lam, 20)
        assert 2 * skellam.sf(math.ceil(t) - 1, lam, lam) < 2.0**-20
        assert t < 12 * math.sqrt(2 * lam) + 60  # and it is not absurdly loose
