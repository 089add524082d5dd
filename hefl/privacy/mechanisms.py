"""The noise and clipping of DP-FedAvg, as pure functions (no accounting here).

    clip_l2(delta, C)              client: scale the update to L2 norm at most C
    gaussian_noise(rng, n, std)    central: float noise on the decrypted sum
    skellam_noise(rng, n, mu)      distributed: each client's integer noise, Poisson(mu) -
                                   Poisson(mu) per coordinate (Agarwal, Kairouz & Liu, 2021)
    skellam_tail(lam, bits)        a bound that Sk(lam) exceeds in absolute value with
                                   probability below 2**-bits (BFV's lane offset is sized by it)

Randomness comes from the ``numpy.random.Generator`` passed in; hefl's parties create theirs from
OS entropy (``np.random.default_rng()``) and never from a seed another party knows.

Example:
    >>> import numpy as np
    >>> np.round(clip_l2(np.array([3.0, 4.0]), 1.0), 12).tolist()
    [0.6, 0.8]
    >>> x = skellam_noise(np.random.default_rng(0), 100_000, 50.0)
    >>> bool(abs(x.var() / 100.0 - 1) < 0.03), x.dtype == np.int64
    (True, True)
"""

from __future__ import annotations

import math

import numpy as np

#: Default tail: a lane offset fails (the noise exceeds it) with probability below 2**-64 per
#: coordinate and round.
TAIL_BITS = 64


def clip_l2(delta: np.ndarray, clip: float) -> np.ndarray:
    """``delta * min(1, clip / ||delta||_2)`` in float64."""
    d = np.asarray(delta, dtype=np.float64)
    peak = float(np.max(np.abs(d))) if d.size else 0.0
    norm = peak * float(np.linalg.norm(d / peak)) if peak > 0 else 0.0
    return d * (clip / norm) if norm > clip else d


def gaussian_noise(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """``n`` independent N(0, std^2) values (zeros when std is 0)."""
    if std <= 0:
        return np.zeros(n)
    return rng.normal(0.0, std, n)


def skellam_noise(rng: np.random.Generator, n: int, mu: float) -> np.ndarray:
    """``n`` independent symmetric Skellam values ``Poisson(mu) - Poisson(mu)`` (variance
    ``2 mu``), as int64; zeros when mu is 0. Sums of these are Skellam again."""
    if mu <= 0:
        return np.zeros(n, dtype=np.int64)
    return rng.poisson(mu, n).astype(np.int64) - rng.poisson(mu, n).astype(np.int64)


def skellam_tail(lam: float, bits: int = TAIL_BITS) -> float:
    """``t`` with ``P(|Sk(lam)| >= t) < 2**-bits``.

    ``|P1 - P2| >= t`` needs ``|P_i - lam| >= t/2`` for one of the two Poisson(lam) draws, and
    Bernstein's inequality bounds each tail by ``exp(-(t/2)^2 / (2 (lam + t/6)))``; four such
    terms below ``2**-bits`` solve a quadratic in ``u = t/2``.
    """
    big_l = math.log(4.0) + bits * math.log(2.0)
    u = big_l / 3.0 + math.sqrt(big_l**2 / 9.0 + 2.0 * big_l * lam)
    return 2.0 * u
