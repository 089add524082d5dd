"""Attacks on DP-FedAvg under encryption, each played by the party it names.

- A curious server in central DP (key-holder custody) receives from the key holder only the
  noised mean: its deviation from the true mean has the planned variance, and asking again
  returns fresh noise, never the exact sum.
- A server that drops honest clients to shrink the distributed noise gets no decryption.
- A server that announces a larger round than it sums (so each client adds a smaller share)
  is refused after decryption: the shares are summed inside the ciphertext, and the sum of the
  announced count carries exactly the planned noise, not more.
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


def test_server_announcing_more_clients_than_it_sums_gets_nothing():
    k, announced = 6, 10
    plan = dp(noise_multiplier=0.5, clip=1.0, mode="distributed",
              min_clients=k).plan(announced, announced, 1, size=SIZE)
    agg = make_aggregator("bfv", SIZE, custody="keyholder", min_clients=2,
                          **plan.aggregator_options())
    spec, scheme = agg.spec, as_scheme(agg)
    scheme.encoder.expect(announced)  # what the server told every client
    rng = np.random.default_rng(2)
    deltas = [rng.normal(size=SIZE) * 0.005 for _ in range(announced)]
    pays = _payloads(scheme, deltas)
    for short in (k, announced - 1):  # dp_min passes the count check; the shares do not
        with pytest.raises(KeyCustodyError, match="it is not released"):
            agg.key_holder.decode(agg.server.aggregate({i: pays[i] for i in range(short)}))
    mean, w = agg.key_holder.decode(agg.server.aggregate(pays))
    dev = (mean * w - np.sum(deltas, axis=0)) * spec.quant_max / spec.clip
    # the announced count carries the planned noise Sk(dp_mu * dp_min), not 10/6 of it
    want = plan.noise_multiplier * plan.sensitivity_l2
    assert abs(np.std(dev) - want) < 5 * want / math.sqrt(2 * SIZE) + 1.0


def test_a_rogue_client_can_claim_at_most_its_own_share():
    """Shares are capped: a client cannot pack more than ``DP_SHARE_UNITS`` (the share of one
    of ``dp_min``), and a sum whose share slot exceeds what its contributions can write is
    discarded, so a client colluding with the server removes at most 1/dp_min of the noise."""
    from hefl.crypto.packing import check_noise, pack
    from hefl.crypto.spec import DP_SHARE_UNITS
    from hefl.errors import CryptoError

    plan = dp(noise_multiplier=0.5, mode="distributed", min_clients=6).plan(8, 8, 1, size=16)
    spec = make_aggregator("bfv", 16, custody="keyholder", **plan.aggregator_options()).spec
    rng = np.random.default_rng(0)
    with pytest.raises(CryptoError, match="outside 1..4096"):
        pack(np.zeros(16), 1, spec, rng, rng, 65537, DP_SHARE_UNITS * 6)
    slots = np.zeros(spec.n_ciphertexts * spec.slot_values, np.uint64)
    slots[0], slots[1] = 6, 6 * DP_SHARE_UNITS + 1
    with pytest.raises(CryptoError, match="more than 6 contributions"):
        check_noise(spec, slots)
    slots[1] = 6 * DP_SHARE_UNITS - 1
    with pytest.raises(KeyCustodyError, match="it is not released"):
        check_noise(spec, slots)
    slots[1] = 6 * DP_SHARE_UNITS
    check_noise(spec, slots)
