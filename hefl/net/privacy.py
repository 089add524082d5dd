"""Differential privacy in deployment: ``[privacy]`` in ``run.toml``, and who enforces what.

    [privacy]               # the arguments of hefl.dp(...)
    epsilon = 8.0           # target over the run's rounds (or noise_multiplier = Z; both: a budget)
    delta = 1e-5
    clip = 1.0              # L2 norm of one client's update
    mode = "central"        # or "distributed" (BFV: each client adds Skellam noise)
    # min_clients = 72      # distributed: the fewest contributions the noise is sized for

The plan (``hefl.privacy.DpPlan``) is made from the registry (N trainers), ``clients_per_round``
(k) and ``rounds``, the same way as in simulation. Each party enforces its part from what *it*
holds, so a server that lies cannot lower the noise:

    coordinator   samples each client with probability k / N from OS entropy (the run's seed
                  does not predict who takes part), divides the decoded sum by k, records epsilon
                  per round (history, ``hefl status``), and stops before a round that would pass
                  the budget; in plaintext aggregation it adds the central noise itself (the
                  server is trusted with the sum in that mode)
    data client   clips its update to ``clip`` and sends weight 1 (``DpEncoder``); under
                  encryption its own key file fixes the clip (``clip_norm``) and, distributed,
                  its Skellam noise (``dp_mu``): what the server says cannot change them
    key holder    central: adds N(0, dp_std^2) to every sum it decrypts (``dp_std`` is in its
                  keys, written by ``hefl keys`` from this plan) and refuses sums whose weights
                  are not all 1; distributed: refuses sums of fewer than ``dp_min`` contributions

A retried attempt draws a new sample; nothing was released by the attempt it replaces.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from hefl.errors import ConfigError
from hefl.privacy import DpConfig, DpPlan, dp

#: Spec options the plan sets; a different value in ``[aggregation]`` is an error.
PLANNED = ("clip", "clip_norm", "max_weight", "max_clients", "bits", "dp_mu", "dp_min")


def dp_config(section: Mapping[str, Any]) -> DpConfig | None:
    """The ``[privacy]`` section as a ``DpConfig`` (None when the section is absent or empty).

    Raises:
        ConfigError: unknown keys or invalid values.
    """
    if not section:
        return None
    known = list(inspect.signature(dp).parameters)
    unknown = set(section) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [privacy]; known: "
                          f"{', '.join(known)}")
    try:
        return dp(**section)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad [privacy] section: {e}") from e


def run_plan(cfg: Any, size: int) -> DpPlan | None:
    """The DP plan of a ``RunConfig`` for a model of ``size`` parameters (None without DP):
    N is the number of registered data clients."""
    trainers = sum(1 for c in cfg.clients if c.role == "client")
    return deployment_plan(cfg.privacy, cfg.aggregation, trainers, cfg.clients_per_round,
                           cfg.rounds, size)


def deployment_plan(privacy: Mapping[str, Any], agg: Mapping[str, Any], num_clients: int,
                    clients_per_round: int, rounds: int, size: int) -> DpPlan | None:
    """The DP plan of a ``[privacy]`` section for this federation (None without DP).

    Raises:
        ConfigError: the section is invalid or the aggregation cannot carry the mode (central
            DP where every client or a committee decrypts; distributed DP without BFV).
    """
    config = dp_config(privacy)
    if config is None:
        return None
    kind, custody = agg.get("kind", "plain"), agg.get("custody", "clients")
    if config.mode == "distributed" and kind != "bfv":
        raise ConfigError("[privacy] mode = \"distributed\": the clients' integer noise sums "
                          "exactly only under BFV; set [aggregation] kind = \"bfv\"")
    if config.mode == "central" and kind != "plain" and custody != "keyholder":
        raise ConfigError(
            f"[privacy] mode = \"central\" adds noise where the sum is first decrypted, but in "
            f"custody {custody!r} that is " + ("every client" if custody == "clients" else
                                               "no single party") +
            "; use custody \"keyholder\", or mode \"distributed\" with BFV")
    return config.plan(num_clients, clients_per_round, rounds, size, int(agg.get("bits", 16)))


def key_options(plan: DpPlan | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (from ``[aggregation]``) with what the plan puts in the keys.

    Raises:
        ConfigError: ``[aggregation]`` sets one of them to another value.
    """
    if plan is None:
        return dict(options)
    planned = plan.aggregator_options()
    clash = sorted(k for k in PLANNED if k in options and k in planned
                   and not math.isclose(float(options[k]), float(planned[k]), rel_tol=1e-12))
    if clash:
        raise ConfigError(
            f"[aggregation] sets {', '.join(clash)}, which [privacy] decides "
            f"({', '.join(f'{k} = {planned[k]}' for k in clash)}); remove them from "
            "[aggregation]")
    return {**options, **planned}


def with_central_noise(plan: DpPlan | None, spec: Any) -> Any:
    """Central DP under encryption: ``spec`` with the key holder's noise (``dp_std``)."""
    if plan is None or plan.mode != "central":
        return spec
    return replace(spec, dp_std=plan.key_holder_std(spec))


def check_keys(plan: DpPlan | None, spec: Any) -> None:
    """The server's check that the keys it was given were made for this plan (a mismatch is a
    misconfiguration, not an attack: the clients and key holder enforce their own keys).

    Raises:
        ConfigError: the keys carry other DP parameters than ``[privacy]`` asks for.
    """
    want: dict[str, float] = {"dp_mu": 0.0, "dp_min": 0.0, "dp_std": 0.0}
    if plan is not None:
        opts = plan.aggregator_options()
        want.update(dp_mu=opts.get("dp_mu", 0.0), dp_min=opts.get("dp_min", 0),
                    clip_norm=plan.config.clip)
        if plan.mode == "central":
            want["dp_std"] = plan.key_holder_std(spec)
    wrong = [k for k, v in want.items() if not math.isclose(float(getattr(spec, k) or 0.0), v,
                                                            rel_tol=1e-9)]
    if wrong:
        raise ConfigError(
            "the public context was made for other privacy settings ("
            + ", ".join(f"{k} {getattr(spec, k)} != {want[k]:g}" for k in wrong)
            + "); run `hefl keys` (or the committee's ceremony) again with this run.toml")


def client_clip(spec: Any, announced: Mapping[str, Any] | None) -> float | None:
    """The clip a data client applies: its own key's ``clip_norm`` when its keys carry DP
    (whatever the server announces), else the server's ``privacy`` announcement (plaintext
    aggregation, where the server is trusted with the sum), else None (no DP)."""
    if spec is not None and (spec.dp_mu or spec.dp_std):
        return float(spec.clip_norm)
    if announced:
        return float(announced["clip"])
    return None
