"""Why hefl refuses CKKS in deployment: the key-recovery attack of Li and Micciancio ("On the
security of homomorphic encryption on approximate numbers", EUROCRYPT 2021), played as the server.

The server made the sum ciphertext (c0, c1) itself. If the key holder published the raw CKKS
decryption (the mean and total weight, i.e. the decoding of c0 + c1*s), the server re-encodes it
at the spec's scale to the exact plaintext polynomial p and solves s = (p - c0) / c1 pointwise in
the NTT domain. This test shows that raw publication yields every key coefficient, in both
custodies, and that a deployment therefore never publishes one: configs and key holders refuse
CKKS (tests/test_attack_server.py::test_no_ckks_decryption_is_published_to_a_server) until noise
flooding (Li, Micciancio, Schultz, Sorrell, CRYPTO 2022) is added to the key holder's decryption.
When it is, this test must fail, and the refusal can be reconsidered.
"""

from __future__ import annotations

import numpy as np
import pytest

from hefl.crypto import make_aggregator


def recover_key(seal, ciphertext, published: np.ndarray) -> list[int]:
    """The attacker's algebra: s = (encode(published) - c0) * c1^-1 mod q, per NTT point."""
    n = seal.spec.poly_degree
    q = int(seal.context.first_context_data().parms().coeff_modulus()[0].value())
    d = ciphertext.dyn_array()  # c0 then c1, NTT form, one prime
    c0 = [int(d.at(i)) for i in range(n)]
    c1 = [int(d.at(n + i)) for i in range(n)]
    pt = seal.encode(published)
    return [((int(pt[i]) - c0[i]) * pow(c1[i], -1, q)) % q for i in range(n)]


@pytest.mark.parametrize("custody", ["clients", "keyholder"])
def test_raw_ckks_decryption_reveals_the_whole_secret_key(custody):
    n = 2048
    agg = make_aggregator("ckks", n - 1, custody=custody, seed=0)  # one full ciphertext
    holder, seal = agg.key_holder, agg.key_holder.share.seal
    updates = {i: np.random.default_rng(i).uniform(-1, 1, n - 1) for i in range(3)}
    total = agg.aggregate({i: agg.encode(i, x, 10.0) for i, x in updates.items()}).payload
    mean, weight = holder.decode(total)  # the raw decryption, unflooded
    sum_ct = seal.ciphertext(total.ciphertexts[0])
    candidate = recover_key(seal, sum_ct, np.concatenate([[weight], mean * weight]))
    key = holder.share.seal_key()
    true = [int(key.data()[i]) for i in range(n)]
    assert candidate == true  # every coefficient: the server could read each client's update
    # a guess is right by chance with probability ~1/q per coefficient: a wrong key matches none
    other = make_aggregator("ckks", n - 1, custody=custody, seed=0).key_holder.share.seal_key()
    assert sum(a == int(other.data()[i]) for i, a in enumerate(candidate)) < n // 100
