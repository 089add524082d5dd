"""The server's running sum (``RunningSum``): updates added as they arrive give the same
ciphertexts as summing them at the end, in any order and from several threads; any doubt about
what was added (an update added twice, or added after its round closed) falls back to a fresh
sum of exactly the round's payloads; and a deployed round closes on the running sum."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hefl.crypto import EncryptedUpdate, SummingServer, make_aggregator
from hefl.errors import CryptoError, UpdateRejected
from hefl.net.testing import run_in_memory
from tests.test_protocol_encrypted import encrypted_demo, options

SIZE = 3000


@pytest.fixture(scope="module")
def fed():
    agg = make_aggregator("bfv", SIZE, custody="keyholder", min_clients=1, max_clients=6,
                          seed=0)
    rng = np.random.default_rng(3)
    deltas = {f"c{i}": rng.uniform(-1, 1, SIZE) for i in range(6)}
    ups = {c: agg.encode(c, d, 1.0 + i) for i, (c, d) in enumerate(deltas.items())}
    return agg, ups, deltas


def _mean(agg, deltas, names):
    ws = {c: 1.0 + i for i, c in enumerate(deltas)}
    return sum(deltas[c] * ws[c] for c in names) / sum(ws[c] for c in names)


def test_arrival_order_and_threads_give_the_ciphertexts_of_the_final_sum(fed):
    agg, ups, deltas = fed
    server: SummingServer = agg.server
    payloads = dict(ups)
    at_end = server.aggregate(payloads)
    run = server.running()
    for c in reversed(list(payloads)):  # arrival order is not the plan's order
        run.add(c, payloads[c])
    streamed = run.aggregate(payloads)
    assert streamed.contributors == at_end.contributors == tuple(payloads)
    assert streamed.payload.ciphertexts == at_end.payload.ciphertexts  # exact additions
    threaded = server.running()
    threads = [threading.Thread(target=threaded.add, args=(c, p)) for c, p in payloads.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert threaded.aggregate(payloads).payload.ciphertexts == at_end.payload.ciphertexts
    mean, _ = agg.decode(streamed)
    assert np.allclose(mean, _mean(agg, deltas, payloads), atol=agg.spec.error_bound)


def _late(run, ups):  # the last two arrived after the round closed
    return {c: ups[c] for c in list(ups)[:4]}


def _twice(run, ups):  # e.g. two submissions racing past the open-task check
    run.add("c0", ups["c0"])
    return ups


def _swapped(run, ups):  # not the object added under c1
    return {**ups, "c1": ups["c2"]}


@pytest.mark.parametrize("doubt", [_late, _twice, _swapped])
def test_any_doubt_about_what_was_added_gives_a_fresh_sum_of_the_payloads(fed, doubt):
    agg, ups, _ = fed
    run = agg.server.running()
    for c, p in ups.items():
        run.add(c, p)
    payloads = doubt(run, ups)
    res = run.aggregate(payloads)
    fresh = agg.server.aggregate(payloads)
    assert res.contributors == fresh.contributors == tuple(payloads)
    assert res.payload.ciphertexts == fresh.payload.ciphertexts
    if doubt is not _twice:  # what was added is not what the round holds
        assert fresh.payload.ciphertexts != agg.server.aggregate(ups).payload.ciphertexts


def _add_refusing_the_bad(run, ups):
    """Add every update of ``ups`` to ``run``, after a corrupt and a short one (each refused),
    and then refuse a seventh (max_clients = 6)."""
    u = ups["c0"]
    corrupt = EncryptedUpdate(u.fingerprint, u.key_id,
                              (b"\xff" * len(u.ciphertexts[0]),) + u.ciphertexts[1:])
    with pytest.raises(CryptoError, match="SEAL refused"):
        run.add("bad", corrupt)
    with pytest.raises(UpdateRejected, match="expected"):
        run.add("short", EncryptedUpdate(u.fingerprint, u.key_id, u.ciphertexts[:1]))
    for c, p in ups.items():  # max_clients = 6
        run.add(c, p)
    with pytest.raises(UpdateRejected, match="max_clients=6"):
        run.add("seventh", ups["c0"])


def test_bad_updates_and_the_max_clients_bound_are_refused_and_nothing_is_added(fed):
    agg, ups, _ = fed
    run = agg.server.running()
    _add_refusing_the_bad(run, ups)
    res = run.aggregate(ups)
    assert res.contributors == tuple(ups)
    assert res.payload.ciphertexts == agg.server.aggregate(ups).payload.ciphertexts


def test_a_sum_not_kept_checks_each_update_as_it_arrives_and_adds_nothing(fed, monkeypatch):
    """``keep=False`` (a deployed server whose key holder recomputes the sum): the same
    refusals at arrival, the same contributors, no addition and no serialized sum; any doubt
    about what was added still gives the fresh sum of the payloads."""
    from hefl.crypto.seal import Seal

    agg, ups, _ = fed
    added: list[object] = []
    monkeypatch.setattr(Seal, "add_inplace", lambda self, acc, ct: added.append(ct))
    run = agg.server.running(keep=False)
    _add_refusing_the_bad(run, ups)
    res = run.aggregate(ups, {"bad": "SEAL refused it"})
    assert res.payload is None and not added
    assert res.contributors == tuple(ups) and res.rejected == {"bad": "SEAL refused it"}
    monkeypatch.undo()
    late = {c: ups[c] for c in list(ups)[:4]}
    fresh = run.aggregate(late)
    assert fresh.payload.ciphertexts == agg.server.aggregate(late).payload.ciphertexts


def test_a_deployed_round_closes_on_the_sum_made_as_updates_arrived(tmp_path, monkeypatch):
    from hefl.crypto.secure_sum import RunningSum

    fresh: list[object] = []  # the summers that summed a round from scratch
    kept: list[bool] = []  # what each round's running sum was told
    aggregate = SummingServer.aggregate
    init = RunningSum.__init__

    def spy(self, payloads):
        fresh.append(self)
        return aggregate(self, payloads)

    def spy_init(self, summer, *, keep=True):
        kept.append(keep)
        init(self, summer, keep=keep)

    monkeypatch.setattr(SummingServer, "aggregate", spy)
    monkeypatch.setattr(RunningSum, "__init__", spy_init)
    demo = encrypted_demo(tmp_path, rounds=2)
    run = run_in_memory(demo, options(demo))
    records, _ = run.finish()
    assert [r.contributors for r in records] == [3, 3]
    assert all(not r.skipped for r in records)
    assert all(r.aggregate_s > 0 for r in records)
    # neither the server nor the key holder (which sums in one pass with its decryption,
    # KeyHolder.decode_updates) summed a round from scratch; and the server, whose sum the
    # key holder never reads, only checked the updates
    assert not fresh
    assert kept and not any(kept)


@pytest.mark.parametrize("workers", [1, 2])
def test_key_holder_sums_and_decrypts_in_one_pass_as_decode_does(workers):
    """``KeyHolder.decode_updates`` (the deployed key holder's recomputed sum) gives decode's
    exact answer; a ciphertext SEAL refuses is named by its update's key, also when a helper
    process found it; too few updates are refused."""
    from hefl.crypto import KeyHolder
    from hefl.errors import KeyCustodyError

    agg = make_aggregator("bfv", 20_000, custody="keyholder", min_clients=2, seed=0)
    rng = np.random.default_rng(5)
    ups = {f"c{i}": agg.encode(f"c{i}", rng.uniform(-1, 1, 20_000), 2.0 + i) for i in range(3)}
    holder = KeyHolder(agg.key_holder.share, min_clients=2, workers=workers)
    try:
        want = agg.key_holder.decode(agg.server.aggregate(ups))
        mean, weight = holder.decode_updates(ups)
        assert weight == want[1] == 9.0 and np.array_equal(mean, want[0])
        u = ups["c1"]
        bad = EncryptedUpdate(u.fingerprint, u.key_id,
                              u.ciphertexts[:-1] + (b"\xff" * len(u.ciphertexts[-1]),))
        with pytest.raises(UpdateRejected, match="SEAL refused") as e:
            holder.decode_updates({**ups, "c1": bad})
        assert e.value.client_id == "c1"
        with pytest.raises(KeyCustodyError, match="min_clients=2"):
            holder.decode_updates({"c0": ups["c0"]})
    finally:
        holder.close()
