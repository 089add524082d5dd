"""Privacy accounting for client-level DP-FedAvg: epsilon from a noise multiplier and back.

The event is what a DP run of hefl does each round: every client takes part independently with
probability ``q`` (Poisson sampling), each contributes one L2-clipped update, and noise is added
to the sum. Neighbouring federations differ by *adding or removing* one client's data, so the sum's
L2 sensitivity is the clip norm ``C`` and the noise multiplier ``z`` is the noise's standard
deviation over ``C`` (McMahan, Ramage, Talwar & Zhang, ICLR 2018). Both mechanisms are accounted
in Rényi DP (Mironov, CSF 2017) and converted to (epsilon, delta) by ``dp-accounting``:

``gaussian`` (central DP)
    ``dp_accounting``'s RDP accountant for a ``PoissonSampledDpEvent`` of a ``GaussianDpEvent``
    (Mironov, Talwar & Zhang 2019), self-composed over the rounds.

``skellam`` (distributed DP)
    Each client adds Skellam noise to its integer update; a sum of independent Skellams is a
    Skellam, so the aggregate carries ``Sk(mu)`` per coordinate however it is split. Its RDP at
    integer order ``a`` is at most (Agarwal, Kairouz & Liu, NeurIPS 2021, Theorem 3.5)
    ``a D2^2 / (4 mu) + min(((2a - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu))`` for integer
    sensitivities ``D1``, ``D2``. Poisson sampling (add/remove) amplifies any mechanism's integer
    RDP curve by the binomial bound of Steinke ("Composition of Differential Privacy & Privacy
    Amplification by Subsampling", arXiv:2210.00597, 2022, Section 6; the form of Zhu & Wang,
    ICML 2019, Theorem 6), which for a Gaussian curve is exactly Mironov, Talwar & Zhang's
    sampled-Gaussian RDP that ``dp-accounting`` computes (a test checks this). The smaller of the
    amplified and the plain curve is composed and converted by ``dp_accounting.rdp.compute_epsilon``.
    Google's distributed-DP code uses Zhu & Wang's looser general form (a factor 3 on the terms of
    order >= 3) by default; ``poisson_subsampled_rdp(..., factor=3)`` gives it.

Amplification by sampling holds against whoever does not learn which clients took part (other
clients, users of the released model). A server that sees who took part gets the unamplified
guarantee, ``sampling_rate=1`` (``Event.unamplified``); hefl reports both.

Example:
    >>> ev = Event("gaussian", noise_multiplier=1.0, num_clients=1000, clients_per_round=100)
    >>> round(epsilon(ev, rounds=50, delta=1e-5), 2)
    5.89
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from hefl.errors import ConfigError

#: Integer orders for the Skellam curve (the subsampling bound needs integers).
SKELLAM_ORDERS = tuple(range(2, 129)) + (160, 192, 256)
#: Largest noise multiplier calibration searches.
MAX_NOISE_MULTIPLIER = 1e4


@dataclass(frozen=True)
class Event:
    """One round's privacy event, repeated every round.

    Attributes:
        mechanism: ``"gaussian"`` or ``"skellam"``.
        noise_multiplier: noise standard deviation of the sum over its L2 sensitivity.
        num_clients: N.
        clients_per_round: expected clients per round; each takes part with probability
            ``clients_per_round / num_clients`` (1: everyone, every round).
        sensitivity_l2, sensitivity_l1: Skellam only: the integer sum's sensitivities (the
            noise is ``Sk(mu)`` with variance ``2 mu = (noise_multiplier * sensitivity_l2)^2``).
    """

    mechanism: str
    noise_multiplier: float
    num_clients: int
    clients_per_round: int
    sensitivity_l2: float = 0.0
    sensitivity_l1: float = 0.0

    @property
    def sampling_rate(self) -> float:
        return min(self.clients_per_round, self.num_clients) / self.num_clients

    @property
    def skellam_mu(self) -> float:
        """Skellam parameter of the aggregate noise (per coordinate, integer units)."""
        return (self.noise_multiplier * self.sensitivity_l2) ** 2 / 2.0

    @property
    def unamplified(self) -> Event:
        """The same event seen by a party that knows who took part: no sampling."""
        return replace(self, clients_per_round=self.num_clients)


def gaussian_epsilon(event: Event, rounds: int, delta: float) -> float:
    """``dp_accounting``'s epsilon for ``rounds`` Poisson-sampled Gaussian rounds."""
    import dp_accounting
    from dp_accounting import rdp

    gauss = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    one: dp_accounting.DpEvent = gauss
    if event.sampling_rate < 1.0:
        one = dp_accounting.PoissonSampledDpEvent(event.sampling_rate, gauss)
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(one, rounds))
    return float(acc.get_epsilon(delta))


def skellam_rdp(order: np.ndarray, mu: float, l2: float, l1: float) -> np.ndarray:
    """Agarwal, Kairouz & Liu (2021), Theorem 3.5: RDP of the Skellam mechanism ``Sk(mu)``
    (variance ``2 mu``) for an integer query with sensitivities ``l1`` and ``l2``."""
    a = np.asarray(order, dtype=np.float64)
    first = a * l2**2 / (4.0 * mu)
    second = np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (16.0 * mu**2),
                        3.0 * l1 / (4.0 * mu))
    return first + second


def poisson_subsampled_rdp(base: Callable[[np.ndarray], np.ndarray], q: float,
                           orders: tuple[int, ...], factor: float = 1.0) -> np.ndarray:
    """RDP at integer ``orders`` of a mechanism with RDP curve ``base`` run on a Poisson sample
    of rate ``q`` (add/remove), never above the unsampled curve:

        (1/(a-1)) log[(1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
                      + factor * sum_{l=3..a} C(a,l) q^l (1-q)^(a-l) e^((l-1) eps(l))]

    ``factor`` 1: Steinke (2022), Section 6 (Zhu & Wang 2019, Theorem 6); 3: Zhu & Wang's
    general Theorem 5.
    """
    plain = base(np.asarray(orders, dtype=np.float64))
    if q >= 1.0:
        return plain
    eps = base(np.arange(2, max(orders) + 1, dtype=np.float64))  # eps[l - 2] = eps(l)
    lq, l1q = math.log(q), math.log1p(-q)
    out = []
    for a, cap in zip(orders, plain):
        ls = np.arange(2, a + 1, dtype=np.float64)
        log_comb = math.lgamma(a + 1) - _lgamma(ls + 1) - _lgamma(a - ls + 1)
        terms = log_comb + ls * lq + (a - ls) * l1q + (ls - 1) * eps[: a - 1]
        terms[1:] += math.log(factor)
        head = (a - 1) * l1q + math.log(a * q - q + 1)
        allt = np.concatenate([[head], terms])
        peak = float(np.max(allt))
        out.append(min(float(cap),
                       (peak + math.log(float(np.sum(np.exp(allt - peak))))) / (a - 1)))
    return np.asarray(out)


def _lgamma(x: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return np.asarray(gammaln(x))


def skellam_epsilon(event: Event, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` Poisson-sampled Skellam rounds (Theorem 3.5 amplified by
    ``poisson_subsampled_rdp``), converted by ``dp_accounting.rdp.compute_epsilon``."""
    from dp_accounting.rdp import compute_epsilon

    mu = event.skellam_mu
    curve = poisson_subsampled_rdp(
        lambda a: skellam_rdp(a, mu, event.sensitivity_l2, event.sensitivity_l1),
        event.sampling_rate, SKELLAM_ORDERS)
    return float(compute_epsilon(SKELLAM_ORDERS, rounds * curve, delta)[0])


def epsilon(event: Event, rounds: int, delta: float) -> float:
    """Epsilon spent by ``rounds`` rounds of ``event`` at ``delta`` (0 rounds: 0; no noise:
    infinite)."""
    if rounds <= 0:
        return 0.0
    if event.noise_multiplier <= 0:
        return math.inf
    if event.mechanism == "gaussian":
        return gaussian_epsilon(event, rounds, delta)
    if event.mechanism == "skellam":
        return skellam_epsilon(event, rounds, delta)
    raise ConfigError(f"unknown DP mechanism {event.mechanism!r}; choose gaussian or skellam")


def calibrate(event_of: Callable[[float], Event], target: float, rounds: int, delta: float,
              rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose ``rounds`` rounds spend at most
    ``target`` epsilon (epsilon falls as the noise grows, so bisection finds it).

    Raises:
        ConfigError: no multiplier up to ``MAX_NOISE_MULTIPLIER`` reaches ``target``.
    """
    def eps(z: float) -> float:
        return epsilon(event_of(z), rounds, delta)

    hi = 1.0
    while eps(hi) > target:
        hi *= 2.0
        if hi > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"epsilon {target} over {rounds} rounds at delta {delta} needs a noise multiplier "
                f"above {MAX_NOISE_MULTIPLIER:g}; raise epsilon or lower rounds")
    lo = 0.0
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2.0
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi
