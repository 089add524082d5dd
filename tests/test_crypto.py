"""Encrypted aggregation: exact within the documented bound, key custody, bad input, algorithms."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as sealapi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hefl
from hefl.aggregation import PlainAggregator
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
from hefl.crypto.seal import Seal
from hefl.crypto.spec import LARGE_UPDATE_CIPHERTEXTS
from hefl.errors import (
    ConfigError,
    ContextMismatch,
    CryptoError,
    KeyCustodyError,
    RoundError,
    UpdateRejected,
)

ROOT = Path(__file__).resolve().parents[1]

# (scheme, custody, options): the default BFV (1 lane), packed BFV (2 lanes), and CKKS
CONFIGS = [
    ("bfv", "clients", {}),
    ("bfv", "keyholder", {}),
    ("bfv-packed", "clients", {}),
    ("ckks", "clients", {}),
    ("ckks", "keyholder", {}),
]


@functools.cache
def aggregator(index: int, size: int):
    scheme, custody, options = CONFIGS[index]
    return make_aggregator(scheme, size, custody=custody, min_clients=1, seed=index, **options)


def weighted_mean(xs, ws):
    return sum(x * w for x, w in zip(xs, ws, strict=True)) / sum(ws)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(CONFIGS) - 1),
    size=st.sampled_from([1, 5, 2047, 4097]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 6),
)
def test_encrypted_weighted_mean_equals_plaintext_within_bound(index, size, seed, n):
    rng = np.random.default_rng(seed)
    agg = aggregator(index, size)
    xs = [rng.uniform(-1, 1, size) for _ in range(n)]
    xs[0][: min(size, 2)] = [1.0, -1.0][: min(size, 2)]  # the clip edges
    ws = [float(rng.integers(1, min(500, agg.spec.max_weight // n) + 1)) for _ in range(n)]
    updates = {i: agg.encode(i, x, w) for i, (x, w) in enumerate(zip(xs, ws, strict=True))}
    mean, total = agg.decode(agg.aggregate(updates))
    assert total == pytest.approx(sum(ws), rel=1e-6)
    err = np.abs(mean - weighted_mean(xs, ws)).max()
    assert err < agg.spec.error_bound, (agg, err)


def test_bfv_rounding_is_unbiased():
    agg = make_aggregator("bfv", 2000, bits=4, min_clients=1, seed=3)  # coarse: Q = 7
    x = np.full(2000, 0.05)  # between two levels (1/7 apart)
    means = [agg.decode(agg.aggregate({0: agg.encode(0, x, 1.0)}))[0].mean() for _ in range(5)]
    assert np.mean(means) == pytest.approx(0.05, abs=3e-3)
    assert agg.spec.error_bound == pytest.approx(1 / 7)


def test_packed_layout_and_budget():
    spec = bfv_spec(10**6)  # default: precision first; a large seeded update: N = 4096
    assert (spec.lanes, spec.bits, spec.max_weight, spec.poly_degree) == (1, 16, 2**16, 4096)
    assert bfv_spec(10**6, symmetric=False).poly_degree == 4096
    edge = LARGE_UPDATE_CIPHERTEXTS * 2048 - 1  # values = size + the weight slot
    assert (bfv_spec(edge - 1).poly_degree, bfv_spec(edge).poly_degree) == (2048, 4096)
    packed = bfv_spec(10**6, bits=12, max_weight=2**10)
    assert packed.lanes == 2 and packed.lane_bits * 2 < packed.plain_bits
    for s in (spec, packed, bfv_spec(10, symmetric=False), ckks_spec(10)):
        assert s.coeff_bits <= {2048: 54, 4096: 109}[s.poly_degree]  # 128-bit security


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("ring", [2048, 4096])
def test_noise_budget_holds_max_clients(symmetric, ring):
    """Summing max_clients fresh ciphertexts leaves noise budget: the modulus choice is enough,
    at both rings (large updates get N = 4096 with the same modulus; its noise is larger)."""
    spec = dataclasses.replace(bfv_spec(100, symmetric=symmetric, max_clients=128),
                               poly_degree=ring)
    c = key_ceremony(spec)
    client = EncryptingClient(c.shares[0] if symmetric else c.public, seed=0)
    server = SummingServer(c.public)
    x = np.ones(100)
    agg = server.aggregate({i: client.encode(i, x, 512.0) for i in range(spec.max_clients)})
    assert agg.count == spec.max_clients
    seal = c.shares[0].seal
    dec = seal.decryptor(c.shares[0].seal_key())
    ct = seal.ciphertext(agg.payload.ciphertexts[0])
    assert seal.noise_budget(dec, ct) > 0
    mean, w = KeyHolder(c.shares[0]).decode(agg)
    assert w == 512.0 * spec.max_clients and np.allclose(mean, 1.0, atol=spec.error_bound)


def test_upload_bytes_within_budget():
    """Bytes per parameter vs 4-byte float32 (must <= 4x; clients-hold-key default <= 2x)."""
    size = 50_000
    x = np.random.default_rng(0).uniform(-1, 1, size)
    for custody, limit in (("clients", 2.0), ("keyholder", 4.0)):
        agg = make_aggregator("bfv", size, custody=custody, seed=0)
        ratio = agg.nbytes(agg.encode(0, x, 10.0)) / (4 * size)
        assert ratio <= limit, (custody, ratio)


# ---------------------------------------------------------------- key custody


def _walk(obj, seen=None):
    """Every object reachable from ``obj`` through attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    children = []
    if isinstance(obj, dict):
        children = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    for c in children:
        yield from _walk(c, seen)


def test_clients_hold_key_server_has_no_secret():
    ceremony = key_ceremony(bfv_spec(300))
    share = ceremony.shares[0]
    public_bytes = ceremony.public.to_bytes()
    assert share.secret_key not in public_bytes
    server = SummingServer.from_bytes(public_bytes)
    assert server.public.is_private is False and server.public.public_key == b""
    for obj in _walk(server):
        assert not isinstance(obj, KeyShare)
        assert "SecretKey" not in type(obj).__name__ and "Decryptor" not in type(obj).__name__
        assert not (isinstance(obj, bytes) and share.secret_key in obj)
    with pytest.raises(KeyCustodyError, match="never hold the secret key"):
        SummingServer(share)  # type: ignore[arg-type]
    # clients encrypt with the shared key and decrypt the aggregate themselves
    clients = [EncryptingClient(KeyShare.from_bytes(share.to_bytes()), seed=i) for i in range(3)]
    xs = [np.full(300, v) for v in (0.1, 0.2, 0.6)]
    pairs = enumerate(zip(clients, xs, strict=True))
    payloads = {i: c.dumps(c.encode(i, x, 1.0)) for i, (c, x) in pairs}
    total = server.dumps(server.aggregate(payloads).payload)
    mean, w = KeyHolder.from_bytes(share.to_bytes(), min_clients=3).decode(total)
    assert w == 3.0 and np.allclose(mean, 0.3, atol=bfv_spec(300).error_bound)
    assert "secret_key" not in repr(share) and repr(share.secret_key[:8]) not in repr(share)


def test_keyholder_custody_parties_from_bytes_in_separate_processes():
    spec = bfv_spec(200, symmetric=False)
    ceremony = key_ceremony(spec)
    public_bytes = ceremony.public.to_bytes()
    share_bytes = ceremony.shares[0].to_bytes()  # stays with the key holder
    with pytest.raises(KeyCustodyError, match="must not hold the secret key"):
        EncryptingClient(ceremony.shares[0])
    clients = [EncryptingClient(PublicContext.from_bytes(public_bytes), seed=i) for i in range(2)]
    updates = [c.dumps(c.encode(i, np.full(200, 0.5 * i), 3.0)) for i, c in enumerate(clients)]
    # the server runs in its own process with the public context only
    script = (
        "import sys; from hefl.crypto import SummingServer\n"
        "data = sys.stdin.buffer.read(); n = int.from_bytes(data[:4], 'little'); parts = []\n"
        "i = 4\n"
        "for _ in range(n):\n"
        "    k = int.from_bytes(data[i:i+4], 'little'); parts.append(data[i+4:i+4+k]); i += 4+k\n"
        "server = SummingServer.from_bytes(parts[0])\n"
        "agg = server.aggregate(dict(enumerate(parts[1:])))\n"
        "assert not server.public.is_private and agg.count == 2, agg.rejected\n"
        "sys.stdout.buffer.write(server.dumps(agg.payload))\n"
    )
    msg = len([public_bytes, *updates]).to_bytes(4, "little") + b"".join(
        len(p).to_bytes(4, "little") + p for p in [public_bytes, *updates]
    )
    out = subprocess.run([sys.executable, "-c", script], input=msg, capture_output=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, check=True).stdout
    holder = KeyHolder.from_bytes(share_bytes, min_clients=2)
    mean, w = holder.decode(out)
    assert w == 6.0 and np.allclose(mean, 0.25, atol=spec.error_bound)
    with pytest.raises(KeyCustodyError, match="min_clients=3"):
        KeyHolder.from_bytes(share_bytes, min_clients=3).decode(out)


def test_keyholder_refuses_small_aggregate_and_simulation_skips_round():
    agg = make_aggregator("bfv", 4, custody="keyholder", min_clients=2, seed=0)
    one = agg.aggregate({0: agg.encode(0, np.ones(4) * 0.5, 1.0)})
    with pytest.raises(KeyCustodyError, match="refusing to decrypt an aggregate of 1"):
        agg.key_holder.decode(one)
    with pytest.raises(RoundError, match="refusing"):
        agg.decode(one)  # simulation: the round is skipped, the run goes on
    with pytest.raises(KeyCustodyError, match="only sums"):
        agg.key_holder.decode(agg.encode(0, np.ones(4) * 0.5, 1.0))  # one client's update
    empty = agg.aggregate({})
    with pytest.raises(KeyCustodyError, match="aggregate of 0"):
        agg.key_holder.decode(agg.server.dumps(empty.payload))


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def fed():
    """An aggregator, a good update from each of two clients, and their plaintext mean."""
    agg = make_aggregator("bfv", 3000, custody="keyholder", min_clients=1, max_weight=100, seed=1)
    xs = [np.full(3000, 0.25), np.full(3000, -0.5)]
    good = {f"ok{i}": agg.encode(i, x, 10.0) for i, x in enumerate(xs)}
    return agg, good, (xs[0] + xs[1]) / 2


def _round_with(fed, bad):
    agg, good, expected = fed
    res = agg.aggregate({**good, "bad": bad})
    assert res.contributors == tuple(good) and "bad" in res.rejected
    mean, _ = agg.decode(res)
    assert np.allclose(mean, expected, atol=agg.spec.error_bound)
    return res.rejected["bad"]


@pytest.mark.parametrize(
    "options, why",
    [({"bits": 12}, "other HE parameters"), ({"min_clients": 1, "max_weight": 100}, "another key")],
)
def test_ciphertext_from_other_context_or_key_rejected(fed, options, why):
    agg = fed[0]
    other = make_aggregator("bfv", 3000, custody="keyholder", seed=0, **options)
    bad = other.encode(0, np.zeros(3000), 1.0)
    with pytest.raises(ContextMismatch, match=why):
        agg.loads(other.dumps(bad))
    assert why in _round_with(fed, other.dumps(bad))
    assert why in _round_with(fed, bad)


def test_truncated_and_oversized_bytes_rejected(fed):
    agg, good, _ = fed
    data = agg.dumps(good["ok0"])
    with pytest.raises(UpdateRejected, match="truncated"):
        agg.loads(data[:-10])
    with pytest.raises(UpdateRejected, match="oversized"):
        agg.loads(data + b"\0" * 7)
    assert "truncated" in _round_with(fed, data[: len(data) // 2])
    assert "oversized" in _round_with(fed, data + b"x")


def test_corrupt_ciphertext_rejected_by_seal(fed):
    agg, good, _ = fed
    blob = bytearray(good["ok0"].ciphertexts[0])
    blob[20:40] = b"\xff" * 20
    bad = EncryptedUpdate(good["ok0"].fingerprint, good["ok0"].key_id,
                          (bytes(blob),) + good["ok0"].ciphertexts[1:])
    assert "SEAL refused" in _round_with(fed, bad)


def test_vector_longer_than_spec_rejected(fed):
    agg, good, _ = fed
    with pytest.raises(UpdateRejected, match=r"shape \(3001,\)"):
        agg.encode(0, np.zeros(3001), 1.0)
    u = good["ok0"]
    longer = EncryptedUpdate(u.fingerprint, u.key_id, u.ciphertexts + u.ciphertexts[:1])
    with pytest.raises(UpdateRejected, match="longer or shorter"):
        agg.loads(longer.to_bytes())
    assert "expected 2" in _round_with(fed, longer)


def test_plaintext_where_ciphertext_expected_rejected(fed):
    agg = fed[0]
    plain = PlainAggregator(3000)
    payload = plain.encode(0, np.zeros(3000), 1.0)
    with pytest.raises(UpdateRejected, match="plaintext update where a ciphertext"):
        agg.loads(plain.dumps(payload))
    assert "plaintext" in _round_with(fed, plain.dumps(payload))
    assert "plaintext" in _round_with(fed, payload)
    assert "plaintext" in _round_with(fed, np.zeros(3000))


def test_weight_over_bound_rejected(fed):
    agg, good, _ = fed
    with pytest.raises(UpdateRejected, match="exceeds the supported total weight 100"):
        agg.encode(0, np.zeros(3000), 101.0)
    heavy = {i: agg.encode(i, np.zeros(3000), 60.0) for i in range(2)}
    with pytest.raises(CryptoError, match="total weight 120 exceeds the supported bound 100"):
        agg.key_holder.decode(agg.aggregate(heavy))


def test_fractional_weight_rejected_by_bfv_accepted_by_ckks():
    with pytest.raises(UpdateRejected, match="not an integer"):
        make_aggregator("bfv", 10).encode(0, np.zeros(10), 0.4)
    agg = make_aggregator("ckks", 10, min_clients=1)
    mean, w = agg.decode(agg.aggregate({0: agg.encode(0, np.full(10, 0.5), 0.4)}))
    assert w == pytest.approx(0.4) and np.allclose(mean, 0.5, atol=1e-6)


def test_unknown_scheme_lists_choices():
    with pytest.raises(ConfigError, match="bfv, bfv-packed, ckks"):
        make_aggregator("paillier", 10)


def test_more_than_max_clients_rejected():
    agg = make_aggregator("bfv", 10, min_clients=1, max_clients=2, seed=0)
    ups = {i: agg.encode(i, np.full(10, 0.5), 1.0) for i in range(3)}
    res = agg.aggregate(ups)
    assert res.count == 2 and "max_clients=2" in res.rejected[2]


# ---------------------------------------------------------------- algorithms end to end


def _blobs_data(seed=0, clients=4):
    from hefl.data.federated import FederatedData

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(240, 5))
    y = (x @ rng.normal(size=5) > 0).astype(int)
    parts = np.array_split(rng.permutation(240)[: 200 + 7 * clients], clients)
    return FederatedData.from_indices(x, y, parts), (x, y)


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
)
def test_every_algorithm_runs_encrypted(name):
    from hefl.models.linear import LogisticRegressionModel

    data, test = _blobs_data()
    model = LogisticRegressionModel(5, 2)
    algo = hefl.make_algorithm(name)
    kw = dict(rounds=4, clients_per_round=3, seed=0, test=test)
    plain = hefl.simulate(model, data, algo, **kw)
    agg = make_aggregator("bfv", model.init_vector().size, custody="keyholder", seed=0)
    enc = hefl.simulate(model, data, algo, aggregator=agg, **kw)
    assert all(r.contributors == 3 and not r.skipped for r in enc.history.records)
    assert np.allclose(enc.params, plain.params, atol=5e-3)
    assert enc.history.records[-1].metrics["test_accuracy"] == pytest.approx(
        plain.history.records[-1].metrics["test_accuracy"], abs=0.02
    )


def test_w1_config_b_encrypted_matches_plaintext_accuracy():
    from hefl.workloads import set_torch_threads, summary, w1

    set_torch_threads(1)
    w = w1("b")
    algo = hefl.fedavg(client_lr=w.client_lr, batch_size=w.batch_size)
    kw = dict(rounds=w.rounds, clients_per_round=w.clients_per_round, test=w.test, seed=0)
    plain = summary(hefl.simulate(w.model, w.data, algo, **kw))
    agg = make_aggregator("bfv", w.model.init_vector().size, seed=0)
    enc = summary(hefl.simulate(w.model, w.data, algo, aggregator=agg, **kw))
    assert enc["final_accuracy"] == pytest.approx(plain["final_accuracy"], abs=0.005)
    assert enc["mean_upload_bytes"] < 2 * plain["mean_upload_bytes"]


def test_seal_context_enforces_128_bit_security():
    import dataclasses

    spec = bfv_spec(10)
    with pytest.raises(Exception, match="128-bit|security"):
        Seal.of(dataclasses.replace(spec, coeff_bits=80))


def test_benchmark_json_has_w4_keys_and_baseline_agrees():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "he_aggregation.py"), "--params", "5000",
           "--clients", "3", "--repeat", "1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    res = json.loads(out)  # exactly one JSON object
    keys = {"params", "clients", "bytes_per_param", "expansion_vs_fp32", "encrypt_s",
            "aggregate_s", "decrypt_s", "max_abs_err"}
    verified = {"sign_s", "verify_s", "verified_decode_s", "decode_request_mb", "add_s",
                "close_s"}
    assert set(res) == keys | verified | {"baseline"} and set(res["baseline"]) == keys
    assert res["add_s"] > 0 and res["close_s"] > 0
    # the key holder downloads every client's update: at least the three uploads
    assert res["decode_request_mb"] * 2**20 >= 3 * res["bytes_per_param"] * 5000
    assert res["max_abs_err"] < bfv_spec(5000).error_bound and res["baseline"]["max_abs_err"] < 1e-5
    assert res["expansion_vs_fp32"] < res["baseline"]["expansion_vs_fp32"]


def test_parallel_encryption_matches_serial():
    spec = bfv_spec(20_000)
    c = key_ceremony(spec)
    x = np.random.default_rng(0).uniform(-1, 1, 20_000)
    serial = EncryptingClient(c.shares[0], seed=5)
    parallel = EncryptingClient(c.shares[0], seed=5, workers=2)
    try:
        ups = {0: serial.encode(0, x, 2.0), 1: parallel.encode(1, x, 2.0)}
    finally:
        parallel.close()
    assert len(ups[1].ciphertexts) == spec.n_ciphertexts
    mean, w = KeyHolder(c.shares[0]).decode(SummingServer(c.public).aggregate(ups))
    assert w == 4.0 and np.abs(mean - x).max() < spec.error_bound


def test_seal_itself_refuses_parameters_below_128_bit_security():
    """Defence in depth: even a spec that slipped past HeSpec's own check is refused by SEAL."""
    import copy

    from hefl.crypto import make_spec
    from hefl.crypto.seal import Seal
    from hefl.errors import CryptoError

    bad = copy.copy(make_spec("bfv", 1000))
    object.__setattr__(bad, "coeff_bits", 60)  # N=2048 allows at most 54 bits at 128-bit security
    with pytest.raises(CryptoError, match="128-bit"):
        Seal.of(bad)


def test_flooding_options_belong_to_ckks_and_leave_bfv_specs_unchanged():
    assert b"flood" not in make_spec("bfv", 10).to_bytes()  # BFV fingerprints as before
    ckks = make_spec("ckks", 10, flood_queries=2**10)
    assert ckks.flood_queries == 2**10 and HeSpec.from_bytes(ckks.to_bytes()) == ckks
    assert ckks.flood_std < make_spec("ckks", 10).flood_std  # fewer decryptions, less noise
    with pytest.raises(ConfigError, match="flood_queries do not apply to BFV"):
        make_spec("bfv", 10, flood_queries=5)
    with pytest.raises(ConfigError, match="needs noise flooding"):
        HeSpec(**{**dataclasses.asdict(ckks), "flood_security": 0})
    with pytest.raises(ConfigError, match="lower max_clients"):
        make_spec("ckks", 10, coeff_bits=54)  # one prime cannot carry the flooding noise


def test_seal_bytes_pass_through_a_private_memfd_never_a_path_on_disk(monkeypatch):
    import os
    import sys

    from hefl.crypto import seal as seal_io

    if sys.platform.startswith("linux"):
        assert seal_io._MEMFD  # anonymous in-memory files: never on disk, never on a shared path
    opened: list[str] = []
    real_open = os.memfd_create if seal_io._MEMFD else None
    if real_open is not None:
        monkeypatch.setattr(os, "memfd_create",
                            lambda *a: (fd := real_open(*a), opened.append(fd))[0])
    share = make_aggregator("bfv", 10, custody="keyholder").key_holder.share
    share.seal_key()  # a secret key passed through SEAL's file-based loader ...
    if real_open is not None:
        assert opened  # ... through memfds, each closed again
        live = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not any("hefl-seal" in link for link in live)


def test_seal_scratch_fallback_is_owner_only_and_never_shared_memory(monkeypatch):
    import os
    import stat

    from hefl.crypto import seal as seal_io

    monkeypatch.setattr(seal_io, "_MEMFD", False)  # as where memfds or /proc are missing
    d = seal_io._scratch_dir()
    assert not os.path.realpath(d).startswith("/dev/shm")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    agg = make_aggregator("bfv", 10, custody="keyholder", min_clients=1, seed=0)
    agg.key_holder.share.seal_key()  # a secret key passed through the scratch directory ...
    mean, _ = agg.decode(agg.aggregate({1: agg.encode(1, np.full(10, 0.5), 1.0)}))
    assert np.allclose(mean, 0.5, atol=agg.spec.error_bound)  # ciphertexts too,
    assert os.listdir(d) == []  # ... and left nothing behind


@pytest.mark.parametrize("size", [3000, LARGE_UPDATE_CIPHERTEXTS * 2048])
def test_bfv_values_are_plaintext_coefficients(size):
    """New BFV specs put the packed values in the plaintext's coefficients; a spec made before
    that field existed keeps its fingerprint (the field is left out of its bytes) and is still
    decoded through SEAL's batching slots. Both sum exactly, and they are not interchangeable."""
    spec = bfv_spec(size, bits=8)
    legacy = dataclasses.replace(spec, coefficients=False)
    assert spec.coefficients and b"coefficients" in spec.to_bytes()
    assert b"coefficients" not in legacy.to_bytes()
    assert spec.fingerprint != legacy.fingerprint
    assert HeSpec.from_bytes(legacy.to_bytes()) == legacy
    t = Seal.of(spec).plain_modulus
    values = np.random.default_rng(0).integers(0, t, size=spec.poly_degree, dtype=np.uint64)
    values[-100:] = 0  # high zero coefficients still decode to N values
    slots = {}
    for s in (spec, legacy):
        seal = Seal.of(s)
        sk, _ = seal.keygen()
        enc, dec = seal.encryptor(sk), seal.decryptor(sk)
        ct = seal.encrypt_full(enc, values)
        seal.add_inplace(ct, seal.encrypt_full(enc, values))
        assert np.array_equal(seal.decrypt(dec, ct), (2 * values) % t)
        pt = sealapi.Plaintext()
        dec.decrypt(ct, pt)
        slots[s.coefficients] = np.asarray(seal.encoder.decode_uint64(pt), dtype=np.uint64)
    assert not np.array_equal(slots[True], slots[False])  # coefficients are not slots
    with pytest.raises(ConfigError, match="BFV"):
        dataclasses.replace(ckks_spec(10), coefficients=True)
