"""Attacks on threshold keys, played by the server together with fewer than ``threshold``
colluding key holders (they hold every public message, every ciphertext and their own shares).

Claims (docs/threat-model.md): fewer than t shares decrypt to noise; one member's partial
decryption alone reveals nothing; each partial carries fresh flooding noise of the stated size;
the server cannot choose the common polynomial; members refuse small aggregates and more
decryptions than their flooding is sized for.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from hefl.crypto import make_aggregator
from hefl.crypto.seal import load_array
from hefl.crypto.threshold import (
    Member,
    Transcript,
    _add,
    _mul,
    _sub,
    lagrange,
    partial_decrypt,
    threshold_ceremony,
)
from hefl.errors import FloodBudgetSpent, KeyCustodyError

#: chi-square with 15 degrees of freedom exceeds 60 with probability about 4e-8
CHI2_15 = 60.0


def chi2_uniform(values: np.ndarray, modulus: int, bins: int = 16) -> float:
    """Chi-square statistic of ``values`` against the uniform distribution on [0, modulus)."""
    idx = np.minimum((values.astype(np.float64) / modulus * bins).astype(int), bins - 1)
    counts = np.bincount(idx.ravel(), minlength=bins)
    expected = idx.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def threshold_round(n: int = 3, t: int = 2, **options):
    agg = make_aggregator("bfv", 8000, custody="threshold", key_holders=n, threshold=t, seed=0,
                          **options)
    rng = np.random.default_rng(0)
    total = agg.aggregate({i: agg.encode(i, rng.uniform(-1, 1, 8000), 3.0)
                           for i in range(3)}).payload
    shares = [m.share for m in agg.key_holder.members.values()]
    return agg, total, shares


def cts_of(agg, total):
    return [agg.server.seal.ciphertext(b) for b in total.ciphertexts]


def decrypt_with(seal, key_polys, cts) -> np.ndarray:
    """SEAL's BFV decryption under ``key_polys``, without the noise-budget check (an attacker
    decrypts whatever it gets)."""
    dec = seal.decryptor(seal.load_secret_key(seal.secret_key_from(key_polys)))
    out = []
    for ct in cts:
        pt = sealapi.Plaintext()
        dec.decrypt(ct, pt)
        out.append(seal.decode(pt))
    return np.stack(out)


def centred_integers(residues: np.ndarray, moduli) -> np.ndarray:
    """The integer polynomial (centred mod q = prod moduli) with these residues (CRT)."""
    q = int(np.prod([int(m) for m in moduli], dtype=object))
    out = []
    for i in range(residues.shape[1]):
        x = 0
        for r, m in zip(residues[:, i], moduli, strict=True):
            mi = q // int(m)
            x += int(r) * mi * pow(mi, -1, int(m))
        x %= q
        out.append(x - q if x > q // 2 else x)
    return np.array(out, dtype=np.float64)


def test_fewer_than_threshold_shares_decrypt_to_uniform_noise():
    agg, total, shares = threshold_round(4, 3)
    seal = agg.server.seal
    moduli = seal.key_moduli
    plain = seal.plain_modulus
    sigma = {j: seal.secret_key_polys(shares[j - 1].seal_key()) for j in (1, 2, 3)}
    honest = _add(_add(_mul(sigma[1], lagrange(1, (1, 2, 3), moduli), moduli),
                       _mul(sigma[2], lagrange(2, (1, 2, 3), moduli), moduli), moduli),
                  _mul(sigma[3], lagrange(3, (1, 2, 3), moduli), moduli), moduli)
    real = decrypt_with(seal, honest, cts_of(agg, total))
    assert chi2_uniform(real, plain) > 100 * CHI2_15  # the real plaintext is far from uniform
    # two colluding members (threshold 3): each share alone, and the two interpolated at 0
    guesses = [sigma[1], sigma[2],
               _add(_mul(sigma[1], lagrange(1, (1, 2), moduli), moduli),
                    _mul(sigma[2], lagrange(2, (1, 2), moduli), moduli), moduli)]
    for guess in guesses:
        slots = decrypt_with(seal, guess, cts_of(agg, total))
        assert chi2_uniform(slots, plain) < CHI2_15
        assert not np.array_equal(slots, real)


def test_one_partial_decryption_alone_reveals_nothing():
    agg, total, shares = threshold_round()
    seal = agg.server.seal
    moduli = seal.coeff_moduli
    cts = cts_of(agg, total)
    part = partial_decrypt(shares[0], cts, (1, 2))  # what member 1 sends for the set {1, 2}
    for i, ct in enumerate(cts):  # the server completes it as if it were the whole decryption
        x = seal.ntt_copy(ct)
        c0, c1 = seal.polys(x, 2)
        load_array(x.dyn_array(), np.concatenate([_add(c0, part.values[i], moduli).ravel(),
                                                  c1.ravel()]))
        seal.evaluator.transform_from_ntt_inplace(x)
        pt = sealapi.Plaintext()
        seal._zero_decryptor.decrypt(x, pt)  # SEAL's rounding, without the noise-budget check
        slots = seal.decode(pt)
        assert chi2_uniform(slots, seal.plain_modulus) < CHI2_15


def test_each_partial_carries_fresh_flooding_noise_of_the_stated_size():
    agg, total, shares = threshold_round()
    spec, seal = agg.spec, agg.server.seal
    moduli = seal.coeff_moduli
    k = len(moduli)
    cts = cts_of(agg, total)
    members = (1, 3)
    share = shares[0]
    weighted = _mul(seal.secret_key_polys(share.seal_key())[:k],
                    lagrange(1, members, moduli), moduli)
    a = partial_decrypt(share, cts, members)
    b = partial_decrypt(share, cts, members)
    assert not np.array_equal(a.values, b.values)  # fresh noise: nothing to average away
    x = seal.ntt_copy(cts[0])
    seal.evaluator.multiply_plain_inplace(x, seal.ntt_plaintext(weighted))
    exact = seal.polys(x, 2)[1]  # c1 * lambda sigma, which the test alone can compute
    z = centred_integers(seal.from_ntt(_sub(a.values[0], exact, moduli)), moduli)
    assert abs(z.mean()) < 4 * spec.flood_std / 64  # centred (4 standard errors)
    assert abs(z.std() / spec.flood_std - 1) < 0.1
    assert spec.flood_std >= 2.0**20 * spec.noise_bound  # 2**(s/2) sqrt(12 tau) above the noise


def test_the_server_cannot_choose_the_common_polynomial():
    spec = make_aggregator("bfv", 10, custody="threshold").spec
    members = [Member(spec, j) for j in (1, 2, 3)]
    honest = Transcript(spec, tuple(m.nonce for m in members))
    forged = Transcript(spec, (members[0].nonce, members[1].nonce, b"\x00" * 32))
    assert honest.seed != forged.seed  # every nonce moves the common polynomial
    with pytest.raises(KeyCustodyError, match="does not hold key holder 3's nonce"):
        members[2].public_share(forged)
    with pytest.raises(KeyCustodyError, match="same nonce"):
        Transcript(spec, (members[0].nonce,) * 3)


def test_members_refuse_small_aggregates_and_decryptions_beyond_their_budget():
    agg, total, _ = threshold_round(flood_queries=3)
    member = agg.key_holder.members[1]
    assert len(total.ciphertexts) == 2
    member.partial(total, (1, 2))
    with pytest.raises(FloodBudgetSpent, match="flood_queries=3"):
        member.partial(total, (1, 2))
    small = agg.aggregate({0: agg.encode(0, np.zeros(8000), 1.0)}).payload
    with pytest.raises(KeyCustodyError, match="at least min_clients=2"):
        agg.key_holder.members[2].partial(small, (2, 3))


def test_no_party_of_the_ceremony_ends_with_the_key():
    spec = make_aggregator("bfv", 10, custody="threshold").spec
    ceremony = threshold_ceremony(spec)
    seal = ceremony.public.seal
    enc = seal.encryptor(seal.load_public_key(ceremony.public.public_key))
    ct = seal.ciphertext(seal.encrypt(enc, np.arange(spec.poly_degree) % 7))
    for share in ceremony.shares:  # every share as a whole key decrypts to noise
        slots = decrypt_with(seal, seal.secret_key_polys(share.seal_key()), [ct])
        assert chi2_uniform(slots, seal.plain_modulus) < CHI2_15
