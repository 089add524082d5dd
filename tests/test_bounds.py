"""Bounds: clients count what they clip, the L2 clip, and the key holder's range check.

A client that declares one weight but packs its values as if it had another is not stopped from
encrypting (no range proofs), but whatever it does that takes the aggregate outside what honest
clients of the declared total weight can produce is refused by the key holder, with the reason.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hefl.crypto import (
    EncryptedUpdate,
    EncryptingClient,
    HeSpec,
    KeyHolder,
    KeyShare,
    PublicContext,
    SummingServer,
    bfv_spec,
    ckks_spec,
    key_ceremony,
    make_aggregator,
    make_spec,
)
from hefl.crypto.keys import partial_decrypt
from hefl.crypto.packing import (
    PACK_CHUNK,
    ClipStats,
    check_range,
    clip_update,
    pack,
    quantize,
    unpack,
)
from hefl.errors import ConfigError, CryptoError, UpdateRejected
from hefl.net.keys import spec_options

EPS = np.finfo(np.float64).eps


def _party_keys(spec: HeSpec) -> tuple[KeyShare, PublicContext | KeyShare, SummingServer]:
    """(key holder's share, what a client encrypts with, the server) for one fresh ceremony."""
    c = key_ceremony(spec)
    return c.shares[0], (c.shares[0] if spec.symmetric else c.public), SummingServer(c.public)


def _encrypt_crafted(key: PublicContext | KeyShare, chunks: np.ndarray) -> EncryptedUpdate:
    """Encrypt hand-made plaintext chunks with the same SEAL wrapper and key a client uses."""
    seal = key.seal
    if isinstance(key, KeyShare):
        enc = seal.encryptor(key.seal_key())
    else:
        enc = seal.encryptor(seal.load_public_key(key.public_key))
    cts = tuple(seal.encrypt(enc, c) for c in chunks)
    return EncryptedUpdate(key.spec.fingerprint, key.key_id, cts)


def _decrypt_unchecked(share: KeyShare, total) -> tuple[np.ndarray, float]:
    """What the key holder would publish without the range check (to show the attack works)."""
    cts = [share.seal.ciphertext(b) for b in total.payload.ciphertexts]
    weighted_sum, weight = unpack(partial_decrypt(share, cts).values, share.spec)
    return weighted_sum / weight, weight


# ------------------------------------------------------------------------- (a) clip counts


@pytest.mark.parametrize("scheme", ["bfv", "ckks"])
def test_clip_counts_are_exact(scheme):
    inside = [0.0, 0.5, -0.999, 1.0, -1.0]  # the edges +-clip themselves are not clipped
    outside = [1.0 + 1e-12, -3.0, 2.5, -1.0 - 1e-9]
    x = np.array(inside + outside)[np.random.default_rng(0).permutation(9)]
    agg = make_aggregator(scheme, x.size, min_clients=1, seed=0)
    mean, _ = agg.decode(agg.aggregate({0: agg.encode(0, x, 2.0)}))
    st = agg.client.last_clip
    assert st == ClipStats(clipped=len(outside), of=x.size, norm=st.norm, scaled=1.0)
    assert st.norm == pytest.approx(np.sqrt(np.sum(x**2)), rel=x.size * EPS)
    assert st.changed
    assert np.abs(mean - np.clip(x, -1, 1)).max() < agg.spec.error_bound

    agg.encode(1, np.clip(x, -1, 1), 1.0)
    assert agg.client.last_clip.clipped == 0 and not agg.client.last_clip.changed
    with pytest.raises(UpdateRejected):
        agg.encode(2, x, agg.spec.max_weight + 1.0)
    assert agg.client.last_clip is None  # never left describing an earlier update


def test_clipping_warns_once_then_logs_at_debug(caplog):
    agg = make_aggregator("bfv", 4, min_clients=1, seed=0)
    caplog.set_level(logging.DEBUG, logger="hefl.crypto.secure_sum")
    agg.encode("a", np.zeros(4), 1.0)
    assert not caplog.records  # nothing clipped: nothing logged
    agg.encode("a", np.array([2.0, 0, 0, 0]), 1.0)
    agg.encode("b", np.array([2.0, -2.0, 0, 0]), 1.0)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [lv for lv, _ in levels] == [logging.WARNING, logging.DEBUG]
    assert "'a': 1 of 4 values clipped" in levels[0][1]
    assert "'b': 2 of 4 values clipped" in levels[1][1]


# ----------------------------------------------------------------------------- (b) L2 clip


@pytest.mark.parametrize("scheme", ["bfv", "bfv-packed", "ckks"])
def test_l2_clip_scales_to_clip_norm(scheme):
    size, clip_norm = 1000, 0.5
    x = np.random.default_rng(1).normal(size=size) * 0.1  # norm ~3.2: scaled by ~0.16
    agg = make_aggregator(scheme, size, min_clients=1, seed=1, clip_norm=clip_norm)
    assert agg.spec.clip_norm == clip_norm
    norm = np.linalg.norm(x)
    scaled, st = clip_update(x, agg.spec)
    assert st.clipped == 0  # the test's premise: after scaling no coordinate exceeds clip
    assert st.scaled == pytest.approx(clip_norm / norm, rel=size * EPS)
    # float64: each product rounds once (eps/2) and the norm's sum adds up to size*eps
    assert np.linalg.norm(scaled) == pytest.approx(clip_norm, abs=size * EPS * clip_norm)

    mean, _ = agg.decode(agg.aggregate({0: agg.encode(0, x, 3.0)}))
    assert agg.client.last_clip == st
    # each coordinate is off by less than error_bound, so the norm by less than sqrt(size) times
    bound = agg.spec.error_bound
    assert np.abs(mean - scaled).max() < bound
    assert abs(np.linalg.norm(mean) - clip_norm) < np.sqrt(size) * bound


def test_l2_clip_leaves_smaller_updates_unchanged():
    spec = bfv_spec(100, clip_norm=0.5)
    x = np.random.default_rng(2).normal(size=100)
    x *= 0.4 / np.linalg.norm(x)
    out, st = clip_update(x, spec)
    assert np.array_equal(out, x) and st.scaled == 1.0 and st.clipped == 0 and not st.changed
    # without clip_norm the same vector is only clipped per coordinate, never scaled
    big = x * 100
    out, st = clip_update(big, bfv_spec(100))
    assert st.scaled == 1.0 and np.array_equal(out, np.clip(big, -1, 1))
    assert st.clipped == int(np.count_nonzero(np.abs(big) > 1))


def test_l2_clip_then_per_coordinate_clip():
    spec = ckks_spec(3, clip=1.0, clip_norm=10.0)
    out, st = clip_update(np.array([60.0, 80.0, 0.0]), spec)  # norm 100 -> scaled by 0.1
    assert st.scaled == pytest.approx(0.1) and st.norm == pytest.approx(100.0)
    assert out.tolist() == [1.0, 1.0, 0.0] and st.clipped == 2  # 6 and 8 cut to clip 1


def test_l2_norm_of_huge_finite_values_does_not_overflow():
    out, st = clip_update(np.array([1e300, 1e300]), bfv_spec(2, clip_norm=1.0))
    assert np.isfinite(st.norm) and st.norm == pytest.approx(np.sqrt(2) * 1e300)
    assert out == pytest.approx([np.sqrt(0.5)] * 2)


def test_clip_norm_in_spec_fingerprint_config_and_old_bytes():
    plain, normed = bfv_spec(10), bfv_spec(10, clip_norm=2)
    assert normed.clip_norm == 2.0 and isinstance(normed.clip_norm, float)
    assert plain.fingerprint != normed.fingerprint
    assert b"clip_norm" not in plain.to_bytes()  # specs without it keep their old bytes
    for s in (plain, normed, ckks_spec(10, clip_norm=0.25)):
        assert HeSpec.from_bytes(s.to_bytes()) == s
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match="clip_norm must be a positive number"):
            bfv_spec(10, clip_norm=bad)
    # deployment: [aggregation] clip_norm reaches the spec `hefl keys` builds
    opts = spec_options({"kind": "ckks", "custody": "clients", "clip_norm": 3.0})
    assert make_spec("ckks", 10, **opts).clip_norm == 3.0


# ---------------------------------------------------------------- (c) the weight-lying attack


@pytest.mark.parametrize("custody", ["clients", "keyholder"])
def test_bfv_client_lying_about_its_weight_is_refused(custody):
    size, fake = 50, 1000
    spec = make_spec("bfv", size, custody=custody)
    share, key, server = _party_keys(spec)
    data = np.random.default_rng(7)
    xs = [data.uniform(-1, 1, size) for _ in range(3)]
    honest_w = [10, 10]
    ups = {i: EncryptingClient(key, seed=i).encode(i, xs[i], w) for i, w in enumerate(honest_w)}
    chunks = pack(xs[2], fake, spec, np.random.default_rng(99))  # lanes of weight 1000 ...
    chunks[0, 0] = 1  # ... declared as weight 1
    ups[2] = _encrypt_crafted(key, chunks)
    total = server.aggregate(ups)
    assert total.count == 3

    # independently: the lanes the three clients put in, and the bound for W = 21
    q = spec.quant_max
    w_total = sum(honest_w) + 1
    lanes = sum(w * (quantize(xs[i], spec, np.random.default_rng(i)) + q)
                for i, w in enumerate(honest_w))
    lanes = lanes + fake * (quantize(xs[2], spec, np.random.default_rng(99)) + q)
    expected = int(np.count_nonzero(lanes > 2 * q * w_total))
    assert 0 < expected < size  # values near -clip are undetectable (they stay in range)
    mean, w = _decrypt_unchecked(share, total)
    assert w == w_total and np.abs(mean).max() > 10 * spec.clip  # the attack would work ...

    with pytest.raises(CryptoError, match=f"out of range: {expected} of {size} coordinates"):
        KeyHolder(share, min_clients=3).decode(total)  # ... but is refused, with the reason


def test_bfv_lane_wrap_is_refused():
    """Lanes that wrap past 2**lane_bits carry into the next lane; the top one into the bits
    above the lanes, which honest sums never reach."""
    spec = make_spec("bfv-packed", 8)
    assert spec.lanes == 2
    share, key, server = _party_keys(spec)
    ups = {i: EncryptingClient(key, seed=i).encode(i, np.ones(8), 10) for i in range(2)}
    chunks = pack(np.ones(8), spec.max_weight, spec, np.random.default_rng(0))
    chunks[0, 0] = 1
    ups[2] = _encrypt_crafted(key, chunks)
    lane_total = 2 * spec.quant_max * (spec.max_weight + 20)  # every value at +clip: exact
    assert lane_total >= 2**spec.lane_bits  # the premise: each lane wraps
    total = server.aggregate(ups)
    with pytest.raises(CryptoError, match="padding values are not empty"):
        KeyHolder(share, min_clients=3).decode(total)


def test_ckks_values_beyond_clip_times_weight_are_refused():
    size, k = 50, 7
    spec = make_spec("ckks", size)
    share, key, server = _party_keys(spec)
    data = np.random.default_rng(3)
    ups = {i: EncryptingClient(key, seed=i).encode(i, data.uniform(-1, 1, size), 2.5)
           for i in range(2)}
    chunks = pack(data.uniform(-1, 1, size), 1.0, spec, np.random.default_rng(0))
    chunks.reshape(-1)[1 : 1 + k] = 100 * spec.clip  # W = 6: honest sums stay within 6 * clip
    ups[2] = _encrypt_crafted(key, chunks)
    total = server.aggregate(ups)
    with pytest.raises(CryptoError, match=f"out of range: {k} of {size} coordinates"):
        KeyHolder(share, min_clients=3).decode(total)


def test_ckks_padding_beyond_noise_margin_is_refused():
    spec = make_spec("ckks", 10)
    share, key, server = _party_keys(spec)
    chunks = pack(np.zeros(10), 1.0, spec, np.random.default_rng(0))
    chunks.reshape(-1)[-1] = 1.0  # a value where no coordinate lives
    total = server.aggregate({0: _encrypt_crafted(key, chunks)})
    with pytest.raises(CryptoError, match="0 of 10 coordinates .* 1 padding values"):
        KeyHolder(share, min_clients=1).decode(total)


# --------------------------------------------------------------- (d) BFV results are exact


@pytest.mark.parametrize("scheme,custody", [("bfv", "clients"), ("bfv", "keyholder"),
                                            ("bfv-packed", "clients")])
def test_bfv_published_result_is_the_exact_rounded_sum(scheme, custody):
    size = 3001  # more than one ciphertext, an odd lane left over when packed
    spec = make_spec(scheme, size, custody=custody)
    share, key, server = _party_keys(spec)
    data = np.random.default_rng(11)
    xs = [data.uniform(-1.5, 1.5, size) for _ in range(3)]  # some clipped
    ws = [3, 40, 7]
    seeds = [101, 202, 303]
    ups = {i: EncryptingClient(key, seed=s).encode(i, x, w)
           for i, (x, w, s) in enumerate(zip(xs, ws, seeds, strict=True))}
    mean, weight = KeyHolder(share, min_clients=3).decode(server.aggregate(ups))

    ints = sum(w * quantize(x, spec, np.random.default_rng(s))
               for x, w, s in zip(xs, ws, seeds, strict=True))
    assert weight == sum(ws)
    assert np.array_equal(np.rint(mean * weight * spec.quant_max / spec.clip), ints)
    # bit for bit the same float64 function of the integer sum: nothing secret-dependent leaks
    assert np.array_equal(mean, ints.astype(np.float64) * (spec.clip / spec.quant_max) / weight)


# -------------------------------------------------------------- (e) no false positive at bound


@pytest.mark.parametrize("scheme,custody", [("bfv", "clients"), ("bfv", "keyholder"),
                                            ("bfv-packed", "clients"), ("ckks", "clients"),
                                            ("ckks", "keyholder")])
def test_honest_aggregate_at_the_bound_is_accepted(scheme, custody):
    size, n = 300, 4
    agg = make_aggregator(scheme, size, custody=custody, min_clients=n, seed=5,
                          max_weight=64, max_clients=n, clip=0.5)
    spec = agg.spec
    signs = np.where(np.arange(size) % 2 == 0, 1.0, -1.0)
    xs = [signs * spec.clip * f for f in (1.0, 1.0, 3.0, 1e6)]  # at or beyond +-clip
    w = spec.max_weight // n
    mean, weight = agg.decode(agg.aggregate({i: agg.encode(i, x, w) for i, x in enumerate(xs)}))
    assert weight == pytest.approx(spec.max_weight, rel=1e-9)
    assert np.abs(mean - signs * spec.clip).max() <= spec.error_bound


def _bfv_slots(spec: HeSpec, lanes: np.ndarray, weight: int) -> np.ndarray:
    """Hand-made decrypted BFV slots holding these lanes and this total weight."""
    flat = np.zeros(spec.n_ciphertexts * spec.slot_values, dtype=np.uint64)
    padded = np.concatenate([lanes, np.zeros((-lanes.size) % spec.lanes, np.uint64)])
    shifts = np.arange(spec.lanes, dtype=np.uint64) * np.uint64(spec.lane_bits)
    flat[0] = weight
    flat[1 : spec.n_values] = np.bitwise_or.reduce(padded.reshape(-1, spec.lanes) << shifts, 1)
    return flat


@pytest.mark.parametrize("lanes_per_slot", [1, 2])
def test_check_range_bfv_boundary(lanes_per_slot):
    spec = bfv_spec(5, bits=12, max_weight=2**10, lanes=lanes_per_slot)
    w = 37
    top = np.uint64(2 * spec.quant_max * w)
    ok = np.array([0, top, 5, top, 1], dtype=np.uint64)
    check_range(spec, _bfv_slots(spec, ok, w))  # 0 and 2*Q*W are both reachable: accepted
    bad = ok.copy()
    bad[[1, 3]] += np.uint64(1)
    with pytest.raises(CryptoError, match=r"2 of 5 coordinates lie outside \[0, 2\*Q\*W\]"):
        check_range(spec, _bfv_slots(spec, bad, w))
    with pytest.raises(CryptoError, match="total weight 1025 exceeds the supported bound 1024"):
        check_range(spec, _bfv_slots(spec, ok, spec.max_weight + 1))
    zero_weight = _bfv_slots(spec, np.zeros(5, np.uint64), 0)
    check_range(spec, zero_weight)  # nothing to average is a RoundError later, not corruption
    zero_weight[1] = 1
    with pytest.raises(CryptoError, match="1 of 5 coordinates"):
        check_range(spec, zero_weight)


def test_deployment_keys_carry_clip_norm(tmp_path):
    """`hefl keys` with `[aggregation] clip_norm`: the deployed client's encoder scales to it."""
    from hefl.net.keys import client_encoder, load_key, write_keys

    files = write_keys({"kind": "bfv", "custody": "clients", "clip_norm": 0.5}, 4, tmp_path)
    key = load_key(files.share)
    assert key.spec.clip_norm == 0.5
    encoder = client_encoder(key, 4)
    encoder.encode("c", np.array([0.3, 0.4, 0.0, 0.0]) * 2, 1.0)  # norm 1.0 -> scaled by 0.5
    st = encoder.last_clip
    assert st.changed and st.scaled == pytest.approx(0.5) and st.clipped == 0


@pytest.mark.parametrize("size", [1, 5000, PACK_CHUNK, PACK_CHUNK + 1, 3 * PACK_CHUNK + 7])
def test_chunked_packing_is_the_whole_array_formula(size):
    """One value per slot is packed a cache-sized chunk at a time; the generator's uniforms are
    drawn in the same order, so every lane equals the whole-array ``w (q + Q)``, bit for bit
    (with clipped values in the mix)."""
    spec = bfv_spec(size)
    d = np.random.default_rng(size).normal(0.0, 0.6, size)  # about 10% beyond clip = 1
    lanes = pack(d, 37, spec, np.random.default_rng(4)).ravel()
    ref = (quantize(d, spec, np.random.default_rng(4)) + spec.quant_max) * 37
    assert lanes[0] == 37 and np.array_equal(lanes[1 : 1 + size], ref.astype(np.uint64))
    assert not lanes[1 + size :].any()


@pytest.mark.parametrize("size", [PACK_CHUNK - 1, 3 * PACK_CHUNK + 5])
def test_clip_counts_across_chunks_and_copies_only_a_clipped_update(size):
    """The count runs a chunk at a time: values just outside the bounds at every chunk edge
    are counted as the whole-array comparison counts them; an update inside the bounds is
    passed on as it is (no model-sized copy), one with a value outside is clipped in a copy."""
    spec = bfv_spec(size)
    x = np.random.default_rng(size).uniform(-1, 1, size)
    edges = [i for k in range(0, size, PACK_CHUNK) for i in (k - 1, k) if 0 <= i < size]
    x[edges] = np.where(np.arange(len(edges)) % 2, 1 + EPS, -1 - EPS)
    out, st = clip_update(x, spec)
    assert st.clipped == np.count_nonzero(np.abs(x) > spec.clip) == len(edges)
    assert np.array_equal(out, np.clip(x, -spec.clip, spec.clip)) and out is not x
    inside = np.clip(x, -1, 1)
    same, st = clip_update(inside, spec)
    assert st.clipped == 0 and same is inside
