"""Attacks on DP-FedAvg under encryption, each played by the party it names.

- A curious server in central DP (key-holder custody) receives from the key holder only the
  noised mean: its deviation from the true mean has the planned variance, and asking again
  returns fresh noise, never the exact sum.
- A server that drops honest clients to shrink the distributed noise gets no decryption.
- A curious key holder in distributed DP decrypts the sum and finds at least the planned noise in
  it: no trusted party sees an un-noised aggregate.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from hefl.crypto import make_aggregator
from hefl.errors import KeyCustodyError
from hefl.privacy import dp
from hefl.privacy.roles import privatize
from hefl.roles import as_scheme

logging.getLogger("absl").setLevel(logging.ERROR)

SIZE = 3000


def _payloads(scheme, deltas):
    return {i: scheme.encoder.encode(i, d, 1.0) for i, d in enumerate(deltas)}


def test_curious_server_receives_only_the_noised_mean():
    plan = dp(noise_multiplier=1.0, clip=1.0).plan(8, 8, 1, size=SIZE)
    agg = make_aggregator("bfv", SIZE, custody="keyholder", **plan.aggregator_options())
    spec = agg.spec
    scheme = privatize(as_scheme(agg), plan, spec.clip / spec.quant_max)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=SIZE) * 0.01 for _ in range(8)]
    total = scheme.summer.aggregate(_payloads(scheme, deltas))
    true = np.sum(deltas, axis=0) / 8
    seen = [scheme.decoder.decode(total)[0] for _ in range(2)]  # what the server is given
    want = plan.sum_std(spec.clip / spec.quant_max) / 8
    for got in seen:
        dev = got - true
        assert abs(np.std(dev) - want) < 5 * want / math.sqrt(2 * SIZE)
    assert not np.allclose(seen[0], seen[1])  # a repeat is fresh noise, not the exact sum


def test_server_dropping_clients_to_shrink_the_noise_gets_no_decryption():
    plan = dp(noise_multiplier=1.0, mode="distributed", min_clients=6).plan(8, 8, 1, size=16)
    agg = make_aggregator("bfv", 16, custody="keyholder", min_clients=2,
                          **plan.aggregator_options())
    pays = _payloads(as_scheme(agg), [np.zeros(16)] * 8)
    kept = {i: pays[i] for i in range(5)}  # the server sums only 5 of 8 answers
    with pytest.raises(KeyCustodyError, match="sized for at least 6"):
        agg.key_holder.decode(agg.server.aggregate(kept))
    agg.key_holder.decode(agg.server.aggregate({i: pays[i] for i in range(6)}))  # 6 is enough


def test_curious_key_holder_sees_the_distributed_noise():
    k = 6
    plan = dp(noise_multiplier=0.5, clip=1.0, mode="distributed",
              min_clients=k).plan(k, k, 1, size=SIZE)
    agg = make_aggregator("bfv", SIZE, custody="keyholder", **plan.aggregator_options())
    spec = agg.spec
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=SIZE) * 0.005 for _ in range(k)]
    mean, w = agg.key_holder.decode(agg.server.aggregate(_payloads(as_scheme(agg), deltas)))
    dev = (mean * w - np.sum(deltas, axis=0)) * spec.quant_max / spec.clip  # integer units
    want = plan.noise_multiplier * plan.sensitivity_l2  # sqrt(k * 2 dp_mu)
    assert abs(np.std(dev) - want) < 5 * want / math.sqrt(2 * SIZE) + 1.0  # + rounding
    assert np.std(dev) > 100  # far above the stochastic-rounding error (< 1 per client)
