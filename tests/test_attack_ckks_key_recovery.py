"""The key-recovery attack of Li and Micciancio ("On the security of homomorphic encryption on
approximate numbers", EUROCRYPT 2021), played as the server, and the noise flooding that stops it
(Li, Micciancio, Schultz & Sorrell, CRYPTO 2022; ``hefl.crypto.flooding``).

The server made the sum ciphertext (c0, c1) itself. A raw CKKS decryption is the polynomial
p = c0 + c1*s (message plus noise); knowing p, the server solves s = (p - c0) / c1 pointwise in
the NTT domain, prime by prime. The tests give the attacker *more* than a deployment publishes:
the decrypted polynomial itself, exactly, not its float64 decoding. Unflooded, that yields every
key coefficient; flooded, none. Then the realistic attacker, who re-encodes the published mean,
gets none either, in both custodies, and the noise it faces has the size the spec promises.
"""

from __future__ import annotations

import numpy as np
import pytest

from hefl.crypto import make_aggregator
from hefl.crypto.flooding import flood, gaussian
from hefl.errors import FloodBudgetSpent, RoundError


def coefficients(obj, count: int) -> list[int]:
    """The first ``count`` uint64 coefficients of a SEAL ciphertext or plaintext (NTT form)."""
    d = obj.dyn_array()
    return [int(d.at(i)) for i in range(count)]


def recover_key(seal, ciphertext, p: list[int]) -> list[int]:
    """The attacker's algebra: s = (p - c0) * c1^-1 mod q_j for every prime j and NTT point."""
    n, moduli = seal.spec.poly_degree, seal.coeff_moduli
    k = len(moduli)
    c = coefficients(ciphertext, 2 * k * n)  # c0 (prime by prime), then c1
    return [((p[j * n + i] - c[j * n + i]) * pow(c[(k + j) * n + i], -1, q)) % q
            for j, q in enumerate(moduli) for i in range(n)]


def true_key(holder) -> list[int]:
    """The key holder's secret key at the data level, for the test's comparison only."""
    n, k = holder.spec.poly_degree, holder.spec.n_primes
    sk = holder.share.seal_key()
    data = sk.data()  # keep ``sk`` alive while its coefficients are read
    return [int(data[i]) for i in range(k * n)]


def round_of(custody: str, *, clients: int = 3, seed: int = 0):
    """One round as the server sees it: (aggregator, updates, the sum it computed)."""
    agg = make_aggregator("ckks", 4095, custody=custody, seed=seed)  # one full ciphertext
    updates = {i: np.random.default_rng(i).uniform(-1, 1, 4095) for i in range(clients)}
    total = agg.aggregate({i: agg.encode(i, x, 10.0) for i, x in updates.items()}).payload
    return agg, updates, total


def decrypted_polynomial(holder, data: bytes, *, flooded: bool) -> list[int]:
    """What the decryptor computes before decoding (c0 + c1 s [+ z]), exactly."""
    import tenseal.sealapi as sealapi

    seal = holder.share.seal
    ct = seal.ciphertext(data)
    if flooded:
        flood(seal, [ct])
    pt = sealapi.Plaintext()
    seal.decryptor(holder.share.seal_key()).decrypt(ct, pt)
    return coefficients(pt, holder.spec.n_primes * holder.spec.poly_degree)


@pytest.mark.parametrize("custody", ["clients", "keyholder"])
def test_exact_unflooded_decryption_reveals_the_key_and_flooding_hides_it(custody):
    agg, _, total = round_of(custody)
    holder = agg.key_holder
    seal, data = holder.share.seal, total.ciphertexts[0]
    key = true_key(holder)
    raw = recover_key(seal, seal.ciphertext(data), decrypted_polynomial(holder, data,
                                                                        flooded=False))
    assert raw == key  # the attack is real: 8192 of 8192 coefficients from one raw decryption
    flooded = recover_key(seal, seal.ciphertext(data), decrypted_polynomial(holder, data,
                                                                            flooded=True))
    # a coefficient matches by chance with probability ~1/q (q ~ 2**46): expect none
    assert sum(a == b for a, b in zip(flooded, key, strict=True)) == 0


@pytest.mark.parametrize("custody", ["clients", "keyholder"])
def test_published_flooded_mean_reveals_no_key_coefficient(custody):
    agg, _, total = round_of(custody)
    holder = agg.key_holder
    seal = holder.share.seal
    mean, weight = holder.decode(total)  # what a deployment publishes to the server
    pt = seal.encode(np.concatenate([[weight], mean * weight]))
    p = coefficients(pt, holder.spec.n_primes * holder.spec.poly_degree)
    candidate = recover_key(seal, seal.ciphertext(total.ciphertexts[0]), p)
    assert sum(a == b for a, b in zip(candidate, true_key(holder), strict=True)) == 0


@pytest.mark.parametrize("custody", ["clients", "keyholder"])
def test_flooding_noise_has_the_promised_size_and_is_fresh(custody):
    agg, updates, total = round_of(custody)
    holder, spec = agg.key_holder, agg.spec
    exact = np.concatenate([[30.0], 10.0 * sum(updates.values())])
    first, second = (np.concatenate([[w], m * w]) for m, w in (holder.decode(total),
                                                                 holder.decode(total)))
    # each value of the sum carries N(0, value_std^2); 4096 samples estimate the deviation to
    # within 3 standard errors (sqrt(2 / 4096) = 2.2%): 10% is a wide, failing-capable margin
    for got in (first, second):
        err = (got - exact)[: 1 + spec.size]
        assert abs(err.std() / spec.value_std - 1) < 0.10
        assert np.abs(err).max() < spec.error_bound * 30.0
    assert not np.array_equal(first, second)  # fresh noise each decryption: never reused ...
    assert holder.budget.used == 2 * spec.n_ciphertexts  # ... and each one is counted


def test_key_refuses_decryptions_beyond_its_flooding_budget():
    agg = make_aggregator("ckks", 10, custody="keyholder", seed=0, flood_queries=2, min_clients=1)
    total = agg.aggregate({0: agg.encode(0, np.zeros(10), 1.0)})
    agg.decode(total)
    agg.decode(total)
    with pytest.raises(FloodBudgetSpent, match="flood_queries=2"):
        agg.decode(total)  # not a skipped round: the run must stop under this key
    assert not issubclass(FloodBudgetSpent, RoundError)


def test_gaussian_sampler_is_centred_with_the_asked_deviation():
    z = gaussian((4, 4096), 2.0**40)
    assert z.dtype == np.int64
    assert abs(z.std() / 2.0**40 - 1) < 0.05  # 16384 samples: standard error 0.55%
    assert abs(z.mean()) < 5 * 2.0**40 / np.sqrt(z.size)
    with pytest.raises(ValueError, match="2\\*\\*48"):
        gaussian((1,), 2.0**49)
