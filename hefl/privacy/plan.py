"""What a DP run promises, fixed before round 1: the config a user writes and the plan derived
from it for one federation (noise multiplier, sensitivities, per-round epsilon).

    config = dp(epsilon=8, delta=1e-5, clip=1.0, mode="central")
    plan   = config.plan(num_clients=1000, clients_per_round=100, rounds=50, size=650)
    plan.noise_multiplier, plan.epsilon(10), plan.to_json()

``central``: clients clip their updates; whoever first sees the decrypted sum (the key holder in
key-holder custody, the server in plaintext mode) adds ``N(0, (z C')^2)`` before it leaves them.
``distributed``: each client adds Skellam noise to its quantized BFV update, sized so that any
``min_clients`` honest contributions carry the whole noise; nobody sees an un-noised sum.

Sampling is Poisson (each client joins a round with probability ``clients_per_round /
num_clients``) and the mean divides by the expected count (McMahan et al.'s fixed-denominator
estimator), so neither the count nor the sample leaks through the normalisation.

Example:
    >>> p = dp(epsilon=4.0, delta=1e-5, clip=1.0).plan(1000, 100, 50, size=650)
    >>> round(p.noise_multiplier, 2), round(p.epsilon(50), 2) <= 4.0
    (1.23, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from hefl.errors import ConfigError
from hefl.privacy.accounting import Event, calibrate, epsilon

MODES = ("central", "distributed")
#: Default ``min_clients``: the expected count less 3 deviations of the Poisson sample size (a
#: round falls below it with probability about 0.1%, and is then skipped).
LOW_SIGMAS = 3.0
#: Contribution bound (``max_clients``): the expected count plus 6 deviations.
COUNT_SIGMAS = 6.0


@dataclass(frozen=True)
class DpConfig:
    """Client-level DP-FedAvg settings (``hefl.dp`` builds one).

    Attributes:
        delta: target delta (below 1 / number of clients, as a rule).
        clip: L2 bound C on each client's update.
        mode: ``"central"`` or ``"distributed"``.
        epsilon: with no ``noise_multiplier``: the target, calibrated over the planned rounds;
            with one: a budget the run stops before exceeding. ``math.inf``: clip only, no noise.
        noise_multiplier: the noise's deviation over the sensitivity, fixed.
        min_clients: distributed only: the fewest contributions the noise is sized for (default:
            the expected count less 3 deviations of the Poisson sample size); a round with fewer
            is not decrypted (skipped, and still counted against the budget).
    """

    delta: float
    clip: float
    mode: str = "central"
    epsilon: float | None = None
    noise_multiplier: float | None = None
    min_clients: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown DP mode {self.mode!r}; choose one of {MODES}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"DP clip must be a positive L2 norm, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"DP delta must be in (0, 1), got {self.delta}")
        if self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError("give DP a target epsilon or a noise multiplier (or both: the "
                              "epsilon is then a budget the run stops at)")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"DP epsilon must be > 0 (math.inf: no noise), got {self.epsilon}")
        if self.noise_multiplier is not None and not (
                self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.min_clients is not None and self.min_clients < 1:
            raise ConfigError(f"DP min_clients must be >= 1, got {self.min_clients}")

    def plan(self, num_clients: int, clients_per_round: int, rounds: int, size: int,
             bits: int = 16) -> DpPlan:
        """The plan for a federation: calibrates the noise multiplier if needed.

        Args:
            bits: distributed: the BFV quantization bits (``Q = 2**(bits-1) - 1`` per clip).

        Raises:
            ConfigError: the counts are invalid, or the target epsilon is out of reach.
        """
        if num_clients < 1 or clients_per_round < 1 or rounds < 0 or size < 1:
            raise ConfigError("DP needs >= 1 client, >= 1 client per round, rounds >= 0 and a "
                              "model of >= 1 parameter")
        k = min(clients_per_round, num_clients)
        q = k / num_clients
        low = math.floor(k - LOW_SIGMAS * math.sqrt(k * (1 - q)))
        need = self.min_clients if self.min_clients is not None else max(1, low)
        if self.mode == "distributed" and need > k:
            raise ConfigError(f"DP min_clients={need} exceeds the {k} clients expected per round")
        base = DpPlan(self, num_clients, k, rounds, size, 0.0,
                      quant_max=2 ** (bits - 1) - 1 if self.mode == "distributed" else 0,
                      min_clients=need if self.mode == "distributed" else 0)
        if self.noise_multiplier is not None:
            return replace(base, noise_multiplier=float(self.noise_multiplier))
        assert self.epsilon is not None
        if math.isinf(self.epsilon) or rounds == 0:
            return base
        z = calibrate(lambda z: replace(base, noise_multiplier=z).event, self.epsilon,
                      rounds, self.delta)
        return replace(base, noise_multiplier=z)


def dp(epsilon: float | None = None, delta: float = 1e-5, clip: float = 1.0,
       mode: str = "central", noise_multiplier: float | None = None,
       min_clients: int | None = None) -> DpConfig:
    """Client-level differential privacy for ``hefl.simulate(..., privacy=hefl.dp(...))``.

    Example:
        >>> dp(epsilon=8, delta=1e-5, clip=1.0, mode="distributed").mode
        'distributed'
    """
    return DpConfig(delta=float(delta), clip=float(clip), mode=mode,
                    epsilon=None if epsilon is None else float(epsilon),
                    noise_multiplier=None if noise_multiplier is None else float(noise_multiplier),
                    min_clients=min_clients)


@dataclass(frozen=True)
class DpPlan:
    """A DP config bound to one federation.

    Attributes:
        noise_multiplier: z (0: no noise).
        quant_max: distributed: Q, the integer a value of ``clip`` quantizes to.
        min_clients: distributed: the contributions the noise is sized for.
    """

    config: DpConfig
    num_clients: int
    clients_per_round: int
    rounds: int
    size: int
    noise_multiplier: float
    quant_max: int = 0
    min_clients: int = 0
    _spent: dict[int, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def sensitivity_l2(self) -> float:
        """Distributed: one client's integer update has L2 norm below ``Q + sqrt(d)`` (the
        scaled clip plus at most 1 of rounding per coordinate); central: ``clip``."""
        if self.mode == "distributed":
            return self.quant_max + math.sqrt(self.size)
        return self.config.clip

    @property
    def sensitivity_l1(self) -> float:
        """Distributed: ``min(D2^2, sqrt(d) D2)`` (integer coordinates)."""
        d2 = self.sensitivity_l2
        return min(d2 * d2, math.sqrt(self.size) * d2) if self.mode == "distributed" else 0.0

    @property
    def event(self) -> Event:
        return Event("skellam" if self.mode == "distributed" else "gaussian",
                     self.noise_multiplier, self.num_clients, self.clients_per_round,
                     self.sensitivity_l2, self.sensitivity_l1)

    @property
    def dp_mu(self) -> float:
        """Distributed: each client's Skellam parameter, ``(z D2)^2 / (2 min_clients)``."""
        return (self.noise_multiplier * self.sensitivity_l2) ** 2 / (2.0 * self.min_clients)

    @property
    def max_clients(self) -> int:
        """Contributions one round may hold: the expected count plus 6 deviations."""
        k, q = self.clients_per_round, self.sampling_rate
        return min(self.num_clients, math.ceil(k + COUNT_SIGMAS * math.sqrt(k * (1 - q))) + 1)

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds (against observers of the model)."""
        if rounds not in self._spent:
            self._spent[rounds] = epsilon(self.event, rounds, self.config.delta)
        return self._spent[rounds]

    def epsilon_unamplified(self, rounds: int) -> float:
        """Epsilon against a party that knows who took part in each round (no amplification)."""
        return epsilon(self.event.unamplified, rounds, self.config.delta)

    def sum_std(self, quant_step: float = 0.0) -> float:
        """Central: deviation of the noise added to the decrypted sum. ``quant_step`` (BFV's
        ``clip / Q``) widens the sensitivity by the rounding, ``sqrt(d) quant_step``."""
        return self.noise_multiplier * (self.config.clip + math.sqrt(self.size) * quant_step)

    def over_budget(self, r: int) -> str:
        """Why round ``r`` must not run (its epsilon would pass the budget), else "". Only a
        run given both a noise multiplier and an epsilon has a budget to stop at (a target
        epsilon alone is met exactly by the calibration)."""
        budget = self.config.epsilon
        if budget is None or self.config.noise_multiplier is None:
            return ""
        spent = self.epsilon(r)
        if spent <= budget * (1 + 1e-9):
            return ""
        return (f"privacy budget reached: round {r} would spend epsilon {spent:.4g} > budget "
                f"{budget:g} (delta {self.config.delta:g}); the run stops after round {r - 1}. "
                "Raise the noise multiplier or the budget, or run fewer rounds")

    def key_holder_std(self, spec: Any) -> float:
        """Central DP under encryption: the ``dp_std`` a key holder's ``HeSpec`` carries (the
        noise it adds to each sum it decrypts), for ``spec`` built with ``aggregator_options``."""
        return self.sum_std(quant_step(spec))

    def aggregator_options(self) -> dict[str, Any]:
        """``make_aggregator`` options that carry this plan (clip, weights 1, and for
        distributed DP the clients' noise)."""
        opts: dict[str, Any] = {"clip": self.config.clip, "clip_norm": self.config.clip,
                                "max_weight": self.max_clients, "max_clients": self.max_clients}
        if self.mode == "distributed":
            opts["bits"] = int(math.log2(self.quant_max + 1)) + 1
            if self.noise_multiplier > 0:  # epsilon inf: clipping only, no noise to carry
                opts.update(dp_mu=self.dp_mu, dp_min=self.min_clients)
        return opts

    def to_json(self, rounds: int | None = None) -> dict[str, Any]:
        """Everything needed to recompute epsilon with dp-accounting (``rounds`` run so far;
        default: the plan's)."""
        r = self.rounds if rounds is None else rounds
        out: dict[str, Any] = {
            "epsilon": self.epsilon(r), "delta": self.config.delta,
            "noise_multiplier": self.noise_multiplier, "clip": self.config.clip,
            "mode": self.mode, "rounds": r, "clients_per_round": self.clients_per_round,
            "num_clients": self.num_clients, "sampling": "poisson",
            "neighboring": "add_remove", "accountant": "rdp", "mechanism": self.event.mechanism,
            "epsilon_unamplified": self.epsilon_unamplified(r),
            "budget": self.config.epsilon,
        }
        if self.mode == "distributed":
            out.update(sensitivity_l2=self.sensitivity_l2, sensitivity_l1=self.sensitivity_l1,
                       min_clients=self.min_clients, skellam_mu_per_client=self.dp_mu)
        return out


def quant_step(spec: Any) -> float:
    """BFV's rounding step ``clip / Q`` for an ``HeSpec`` (0 for CKKS or no spec): it widens
    the central sensitivity by ``sqrt(d) * step`` (``DpPlan.sum_std``)."""
    if spec is None or getattr(spec, "scheme", None) != "bfv":
        return 0.0
    return float(spec.clip) / float(spec.quant_max)
