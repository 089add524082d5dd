"""A threshold key holder in deployment (``VerifiedDecryptor.partial``), attacked by the server.

The server sends DECODE requests (signed contributions) to committee members and fuses their
partial decryptions. It tries to get one round decrypted twice from different contributions,
to collect fresh noise for the same set, to pass unsigned contributions, and to send members
partials that are not theirs. Each member checks the request as a single key holder does.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from hefl.crypto import make_aggregator
from hefl.crypto.threshold import ThresholdPartial, fuse
from hefl.errors import ContextMismatch, DecodeRefused, KeyCustodyError
from hefl.net.decrypt import DecodeLedger, VerifiedDecryptor
from hefl.net.identity import Identity, digest, statement
from hefl.net.proto import hefl_pb2 as pb

MODEL = digest(b"round 1 global model")
SIZE = 5000


@cache
def federation():
    agg = make_aggregator("bfv", SIZE, custody="threshold", key_holders=3, threshold=2, seed=0)
    ids = {f"c{i}": Identity.generate() for i in range(3)}
    rng = np.random.default_rng(0)
    xs = {name: rng.uniform(-1, 1, SIZE) for name in ids}
    blobs = {name: agg.dumps(agg.encode(name, x, 2.0)) for name, x in xs.items()}
    return agg, ids, xs, blobs


def request(names, round_num=1, model=MODEL, task="run/1/1") -> bytes:
    _, ids, _, blobs = federation()
    updates = [pb.SignedUpdate(client=n, task_id=task, payload=blobs[n], signature=ids[n].sign(
        statement("run", round_num, task, model, digest(blobs[n])))) for n in names]
    return pb.DecodeRequest(run_id="run", round=round_num, model_digest=model,
                            updates=updates).SerializeToString()


def members(tmp_path):
    agg, ids, _, _ = federation()
    signers = {n: i.public_hex for n, i in ids.items()}
    return {j: VerifiedDecryptor(m, signers, DecodeLedger(tmp_path / f"kh{j}.sqlite"))
            for j, m in agg.key_holder.members.items()}


def fused_mean(parts: list[bytes]) -> np.ndarray:
    agg, _, _, blobs = federation()
    spec = agg.spec
    total = agg.aggregate({n: agg.loads(b) for n, b in blobs.items()}).payload
    cts = [agg.server.seal.ciphertext(b) for b in total.ciphertexts]
    from hefl.crypto.packing import unpack

    weighted, weight = unpack(fuse(spec, [ThresholdPartial.from_bytes(spec, p) for p in parts],
                                   cts), spec)
    return weighted / weight


def test_verified_partials_fuse_to_the_mean_and_repeat_identically(tmp_path):
    agg, _, xs, _ = federation()
    kh = members(tmp_path)
    body = request(["c0", "c1", "c2"])
    parts = [kh[j].partial("run", 1, body, (1, 2)) for j in (1, 2)]
    want = np.mean(list(xs.values()), axis=0)
    np.testing.assert_allclose(fused_mean(parts), want, atol=agg.spec.error_bound)
    # the same request and set again (a lost reply): the very same bytes, nothing to average
    assert kh[1].partial("run", 1, body, (1, 2)) == parts[0]
    # member 2 went down: the same request for the set {1, 3} gets new partials, and decrypts
    other = [kh[j].partial("run", 1, body, (1, 3)) for j in (1, 3)]
    assert other[0] != parts[0]
    np.testing.assert_allclose(fused_mean(other), want, atol=agg.spec.error_bound)


def test_a_round_cannot_be_decrypted_twice_from_other_contributions(tmp_path):
    kh = members(tmp_path)
    kh[1].partial("run", 1, request(["c0", "c1", "c2"]), (1, 2))
    with pytest.raises(DecodeRefused, match="already decrypted from other contributions"):
        kh[1].partial("run", 1, request(["c0", "c1"]), (1, 2))  # differencing: c2 alone
    with pytest.raises(DecodeRefused, match="already decrypted from other contributions"):
        kh[1].partial("run", 1, request(["c0", "c1"]), (1, 3))  # ... under another set
    with pytest.raises(DecodeRefused, match="replayed model"):
        kh[1].partial("run", 2, request(["c0", "c1", "c2"], round_num=2, task="run/2/1"), (1, 2))


def test_members_check_signatures_count_and_set_like_a_key_holder(tmp_path):
    kh = members(tmp_path)
    body = pb.DecodeRequest.FromString(request(["c0", "c1"]))
    body.updates[1].signature = b"\0" * 64  # the server's own contribution, unsigned
    with pytest.raises(DecodeRefused, match="does not carry its valid signature"):
        kh[1].partial("run", 1, body.SerializeToString(), (1, 2))
    with pytest.raises(DecodeRefused, match="at least min_clients=2"):
        kh[1].partial("run", 1, request(["c0"]), (1, 2))
    with pytest.raises(DecodeRefused, match="exactly 2 distinct"):
        kh[1].partial("run", 1, request(["c0", "c1"]), (1, 2, 3))
    with pytest.raises(DecodeRefused, match="not in the decrypting set"):
        kh[1].partial("run", 1, request(["c0", "c1"]), (2, 3))
    with pytest.raises(DecodeRefused, match="never a whole decryption"):
        kh[1].decode("run", 1, request(["c0", "c1"]))


def test_partial_decryption_bytes_are_checked(tmp_path):
    agg, _, _, _ = federation()
    spec = agg.spec
    good = members(tmp_path)[1].partial("run", 1, request(["c0", "c1"]), (1, 2))
    part = ThresholdPartial.from_bytes(spec, good)
    assert part.to_bytes() == good and part.members == (1, 2) and part.party == 1
    values = part.values.copy()
    values[0, 0, 0] = np.uint64(2**63)  # beyond every prime
    bad = ThresholdPartial(1, part.key_id, (1, 2), values).to_bytes()
    with pytest.raises(ContextMismatch, match="beyond the modulus"):
        ThresholdPartial.from_bytes(spec, bad)
    forged = ThresholdPartial(3, part.key_id, (1, 2), part.values).to_bytes()
    with pytest.raises(KeyCustodyError, match="set without it"):
        ThresholdPartial.from_bytes(spec, forged)
    from hefl.errors import UpdateRejected

    with pytest.raises(UpdateRejected, match="truncated"):
        ThresholdPartial.from_bytes(spec, good[:-8])


def test_old_answers_are_refused_not_answered_with_fresh_noise(tmp_path):
    kh = members(tmp_path)[1]
    bodies = {r: request(["c0", "c1"], round_num=r, model=digest(b"model %d" % r),
                         task=f"run/{r}/1") for r in (1, 2, 3)}
    first = kh.partial("run", 1, bodies[1], (1, 2))
    assert kh.partial("run", 1, bodies[1], (1, 2)) == first
    for r in (2, 3):
        kh.partial("run", r, bodies[r], (1, 2))
    with pytest.raises(DecodeRefused, match="no longer kept"):
        kh.partial("run", 1, bodies[1], (1, 2))
    assert kh.ledger.count() == 3  # each answer counted against the flooding budget
