"""Threshold keys (``hefl.crypto.threshold``): any t of n key holders decrypt, exactly as one key
would; the ceremony has no dealer; the committee works around members that are down or lie.

The tests reconstruct the collective key from t shares (what t colluding members could do, and
only the test does) to compare the fused result with SEAL's own decryption under that key.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hefl.crypto import make_aggregator, make_spec
from hefl.crypto.packing import unpack
from hefl.crypto.seal import Seal
from hefl.crypto.spec import MAX_COEFF_BITS_128, HeSpec, bfv_spec, ckks_spec
from hefl.crypto.threshold import (
    Member,
    Transcript,
    _add,
    _mul,
    fuse,
    lagrange,
    partial_decrypt,
    threshold_ceremony,
)
from hefl.errors import ConfigError, CryptoError, KeyCustodyError, MemberUnavailable


@cache
def aggregator(scheme: str, n: int = 3, t: int = 2, size: int = 5000):
    return make_aggregator(scheme, size, custody="threshold", key_holders=n, threshold=t, seed=0)


def reconstructed_key(shares, members) -> np.ndarray:
    """sum_{j in T} lambda_j sigma_j at the key level: the collective secret key (test only)."""
    seal = shares[0].seal
    moduli = seal.key_moduli
    s = np.zeros((len(moduli), seal.spec.poly_degree), dtype=np.uint64)
    for j in members:
        sigma = seal.secret_key_polys(shares[j - 1].seal_key())
        s = _add(s, _mul(sigma, lagrange(j, members, moduli), moduli), moduli)
    return s


def encrypted_round(agg, clients: int = 3, weight: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    xs = {i: rng.uniform(-1, 1, agg.size) for i in range(clients)}
    total = agg.aggregate({i: agg.encode(i, x, weight) for i, x in xs.items()}).payload
    return xs, total


def ciphertexts(agg, total):
    return [agg.server.seal.ciphertext(b) for b in total.ciphertexts]


@pytest.mark.parametrize("n,t", [(3, 2), (4, 3), (2, 2)])
def test_any_t_of_n_fuse_to_what_the_collective_key_decrypts_bfv(n, t):
    agg = aggregator("bfv", n, t, size=3000)
    shares = [m.share for m in agg.key_holder.members.values()]
    _, total = encrypted_round(agg)
    seal = agg.server.seal
    for members in itertools.combinations(range(1, n + 1), t):
        cts = ciphertexts(agg, total)
        fused = fuse(agg.spec, [partial_decrypt(shares[j - 1], cts, members) for j in members],
                     cts)
        key = seal.load_secret_key(seal.secret_key_from(reconstructed_key(shares, members)))
        dec = seal.decryptor(key)
        single = np.stack([seal.decrypt(dec, ct) for ct in ciphertexts(agg, total)])
        np.testing.assert_array_equal(fused, single)  # BFV: exact, for every decrypting set


def test_fused_ckks_equals_single_key_decryption_within_the_flooding_bound():
    agg = aggregator("ckks")
    spec = agg.spec
    shares = [m.share for m in agg.key_holder.members.values()]
    _, total = encrypted_round(agg)
    seal = agg.server.seal
    members = (1, 3)
    key = seal.load_secret_key(seal.secret_key_from(reconstructed_key(shares, members)))
    single = np.stack([seal.decrypt(seal.decryptor(key), ct) for ct in ciphertexts(agg, total)])
    cts = ciphertexts(agg, total)
    fused = fuse(spec, [partial_decrypt(shares[j - 1], cts, members) for j in members], cts)
    # the difference is the two members' flooding noise (value_std per decoded value each)
    diff = fused - single
    bound = 8 * spec.value_std * np.sqrt(spec.threshold)
    assert np.abs(diff).max() < bound
    assert np.abs(diff).std() > spec.value_std / 2  # and the noise is really there


@settings(max_examples=8, deadline=None)
@given(scheme=st.sampled_from(["bfv", "ckks"]), seed=st.integers(0, 2**32 - 1),
       clients=st.integers(2, 5), members=st.sampled_from([(1, 2), (1, 3), (2, 3)]))
def test_threshold_round_equals_the_plaintext_weighted_mean(scheme, seed, clients, members):
    agg = aggregator(scheme)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, agg.size) for _ in range(clients)]
    ws = [float(rng.integers(1, 50)) for _ in range(clients)]
    total = agg.aggregate({i: agg.encode(i, x, w) for i, (x, w) in
                           enumerate(zip(xs, ws, strict=True))}).payload
    shares = [m.share for m in agg.key_holder.members.values()]
    cts = ciphertexts(agg, total)
    slots = fuse(agg.spec, [partial_decrypt(shares[j - 1], cts, members) for j in members], cts)
    weighted, weight = unpack(slots, agg.spec)
    want = sum(w * x for w, x in zip(ws, xs, strict=True)) / sum(ws)
    assert abs(weight - sum(ws)) <= agg.spec.error_bound * sum(ws)
    np.testing.assert_allclose(weighted / weight, want, atol=agg.spec.error_bound, rtol=0)


def test_128_contributions_and_t_partials_stay_within_the_noise_budget():
    """The bound the parameters promise, at its limit: 128 fresh public-key ciphertexts summed,
    then 3 flooded partials fused; the fused BFV polynomial still rounds exactly."""
    spec = bfv_spec(100, symmetric=False, parties=4, threshold=3, max_clients=128)
    ceremony = threshold_ceremony(spec)
    seal = ceremony.public.seal
    enc = seal.encryptor(seal.load_public_key(ceremony.public.public_key))
    rng = np.random.default_rng(1)
    plain = seal.plain_modulus
    values = [rng.integers(0, 2**20, spec.poly_degree) for _ in range(128)]
    acc = seal.ciphertext(seal.encrypt(enc, values[0]))
    for v in values[1:]:
        seal.add_inplace(acc, seal.ciphertext(seal.encrypt(enc, v)))
    members = (1, 2, 4)
    parts = [partial_decrypt(ceremony.shares[j - 1], [acc], members) for j in members]
    fused = fuse(spec, parts, [acc])[0]
    np.testing.assert_array_equal(fused, np.sum(values, axis=0) % plain)
    # the noise SEAL measures on the fused polynomial (decrypted under the zero key) leaves room
    moduli = seal.coeff_moduli
    c0 = seal.polys(seal.ntt_copy(acc), 2)[0]
    for p in parts:
        c0 = _add(c0, p.values[0], moduli)
    x = seal.ntt_copy(acc)
    from hefl.crypto.seal import load_array

    load_array(x.dyn_array(), np.concatenate([c0.ravel(), seal.polys(x, 2)[1].ravel()]))
    seal.evaluator.transform_from_ntt_inplace(x)
    assert seal.noise_budget(seal._zero_decryptor, x) >= 2


def test_the_ceremony_has_no_dealer_and_gives_a_public_key_for_the_shared_key():
    spec = make_spec("bfv", 100, custody="threshold")
    ceremony = threshold_ceremony(spec)
    seal = ceremony.public.seal
    moduli = seal.key_moduli
    public_key = seal.load_public_key(ceremony.public.public_key)  # alive while read
    pk = seal.polys(public_key.data(), 2)
    s = reconstructed_key(ceremony.shares, (1, 2))
    assert (s == reconstructed_key(ceremony.shares, (2, 3))).all()  # one key, any 2 of 3
    # p0 + a s = sum of the members' errors: small (SEAL's clipped normals, 3 of them)
    err = _add(pk[0], _mul(pk[1], s, moduli), moduli)
    k = len(seal.coeff_moduli)
    coeffs = seal.from_ntt(err[:k]).astype(np.int64)
    q = np.array(seal.coeff_moduli, dtype=np.int64)[:, None]
    centred = np.where(coeffs > q // 2, coeffs - q, coeffs)
    assert (centred[0] == centred[1]).all()  # the same small integers modulo both primes
    assert 0 < np.abs(centred).max() <= 3 * 19.2  # |sum of 3 errors| <= 3 * 6 sigma
    # no member's share is the key, and no share alone decrypts
    for share in ceremony.shares:
        assert not (seal.secret_key_polys(share.seal_key()) == s).all()


def test_spec_of_threshold_keys_is_128_bit_and_refuses_what_cannot_work():
    for scheme in ("bfv", "ckks"):
        spec = make_spec(scheme, 1000, custody="threshold", key_holders=4, threshold=3)
        assert sum(spec.coeff_primes) <= MAX_COEFF_BITS_128[spec.poly_degree]
        Seal.of(spec)  # SEAL re-checks 128-bit security
        assert HeSpec.from_bytes(spec.to_bytes()) == spec and not spec.symmetric
    assert b"parties" not in make_spec("bfv", 10).to_bytes()  # older fingerprints unchanged
    with pytest.raises(ConfigError, match="2 <= threshold <= key_holders"):
        make_spec("bfv", 10, custody="threshold", key_holders=3, threshold=4)
    with pytest.raises(ConfigError, match="2 <= threshold"):
        make_spec("bfv", 10, custody="threshold", key_holders=3, threshold=1)
    with pytest.raises(ConfigError, match="only to custody 'threshold'"):
        make_spec("bfv", 10, custody="keyholder", key_holders=3)
    with pytest.raises(ConfigError, match="bfv-packed"):
        make_spec("bfv-packed", 10, custody="threshold")
    with pytest.raises(ConfigError, match="lower max_clients"):
        ckks_spec(10, symmetric=False, parties=32, threshold=2, max_clients=1024)


# -- the committee ---------------------------------------------------------------------------
class Down:
    def __init__(self, party):
        self.party = party

    def partial(self, total, members):
        raise MemberUnavailable(f"key holder {self.party} is down")


class Garbage:
    """A member that answers with random polynomials instead of its partial decryption."""

    def __init__(self, member):
        self.inner, self.party = member, member.party

    def partial(self, total, members):
        p = self.inner.partial(total, members)
        rng = np.random.default_rng()
        return type(p)(p.party, p.key_id, p.members,
                       rng.integers(0, 2**40, p.values.shape, dtype=np.uint64))


def committee_with(agg, **replace):
    from hefl.crypto.secure_sum import Committee

    members = dict(agg.key_holder.members)
    for party, wrap in replace.items():
        members[int(party[1:])] = wrap(members[int(party[1:])])
    return Committee(agg.key_holder.public, list(members.values()))


def plain_mean(xs):
    return np.mean(list(xs.values()), axis=0)


def test_rounds_go_on_while_threshold_members_answer():
    agg = aggregator("bfv")
    xs, total = encrypted_round(agg)
    committee = committee_with(agg, m1=lambda m: Down(m.party))
    mean, weight = committee.decode(total)
    np.testing.assert_allclose(mean, plain_mean(xs), atol=agg.spec.error_bound)
    committee = committee_with(agg, m1=lambda m: Down(m.party), m3=lambda m: Down(m.party))
    with pytest.raises(KeyCustodyError, match=r"missing: \[1, 3\].*threshold=2"):
        committee.decode(total)


def test_a_member_returning_garbage_is_detected_and_named():
    agg = aggregator("bfv")
    xs, total = encrypted_round(agg)
    committee = committee_with(agg, m2=Garbage)
    mean, _ = committee.decode(total)  # (1,2) fails the checks, (1,3) decrypts
    np.testing.assert_allclose(mean, plain_mean(xs), atol=agg.spec.error_bound)
    assert committee.suspects == (2,)
    two = aggregator("bfv", 2, 2)
    _, total2 = encrypted_round(two)
    with pytest.raises(CryptoError, match="invalid partial decryption, and with no valid set"):
        committee_with(two, m2=Garbage).decode(total2)


def test_members_refuse_sets_that_do_not_hold_them_and_foreign_transcripts():
    agg = aggregator("bfv")
    _, total = encrypted_round(agg)
    m1 = agg.key_holder.members[1]
    with pytest.raises(KeyCustodyError, match="not in the decrypting set"):
        partial_decrypt(m1.share, ciphertexts(agg, total), (2, 3))
    with pytest.raises(KeyCustodyError, match="exactly 2 distinct"):
        m1.partial(total, (1, 2, 3))
    spec = agg.spec
    a, b = Member(spec, 1), Member(spec, 2)
    with pytest.raises(KeyCustodyError, match="one 32-byte nonce per key holder"):
        Transcript(spec, (a.nonce, b.nonce))


def test_hefl_keys_refuses_to_deal_a_threshold_key(tmp_path):
    from hefl.net.keys import write_keys

    with pytest.raises(ConfigError, match="has no dealer"):
        write_keys({"kind": "bfv", "custody": "threshold"}, 100, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written


def test_members_and_committee_with_helpers_decrypt_exactly_as_one_process():
    """``workers``: each member's partial decryptions and the fusing run in helper processes
    (32 ciphertexts, 8 chunks); BFV decodes exactly, so the mean equals the serial one, and a
    garbled partial is still caught and named."""
    from hefl.crypto.secure_sum import Committee, ThresholdKeyHolder

    agg = make_aggregator("bfv", 4096 * 32, custody="threshold", seed=0, min_clients=1)
    xs, total = encrypted_round(agg, clients=2)
    want, weight = agg.key_holder.decode(total)
    shares = [m.share for m in agg.key_holder.members.values()]
    members = [ThresholdKeyHolder(sh, min_clients=1, workers=2) for sh in shares]
    committee = Committee(agg.key_holder.public, members, workers=2)
    try:
        got, w2 = committee.decode(total)
        assert committee._shared.pool is not None and members[0]._shared.pool is not None
        assert w2 == weight and np.array_equal(got, want)
        garbled = Committee(agg.key_holder.public, [members[0], Garbage(members[1]), members[2]],
                            workers=2)
        got, _ = garbled.decode(total)
        assert np.array_equal(got, want) and garbled.suspects == (2,)
        garbled.close()
    finally:
        committee.close()
