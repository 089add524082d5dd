"""Threshold custody deployed: a committee of 3 key holders made the key in its own ceremony
(no dealer), any 2 decrypt; the server fans DECODE tasks out to live members and fuses their
partial decryptions. Rounds go on while 2 members answer, also when one is killed mid-run."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from hefl.crypto.threshold import ThresholdPartial
from hefl.net.client import FederationClient
from hefl.net.store import Store
from hefl.net.testing import (
    events,
    make_demo,
    run_in_memory,
    run_in_threads,
    spawn_client,
    spawn_key_holder,
    spawn_server,
    wait_event,
)
from tests.test_net_encrypted import MODEL, plaintext, small_digits

COMMITTEE = ["kh1", "kh2", "kh3"]
THRESHOLD = {"kind": "bfv", "custody": "threshold", "key_holders": COMMITTEE, "threshold": 2,
             "bits": 16, "clip": 1.0}


def demo_for(tmp_path, rounds):
    return make_demo(tmp_path, small_digits(), model=MODEL, rounds=rounds, clients_per_round=3,
                     aggregation=THRESHOLD, server={"min_clients": 2}, key_holders=COMMITTEE)


def share(demo, name):
    return demo.root / "keys" / name / "share.key"


@pytest.mark.timeout(180)
def test_two_of_three_key_holders_decrypt_every_round_equal_to_plaintext(tmp_path):
    demo = demo_for(tmp_path, rounds=2)
    public = demo.root / "keys" / "public.ctx"
    opts = {n: {"he_key": public} for n in demo.names}
    # kh3 never starts: kh1 and kh2 decrypt every round
    opts.update({kh: {"he_key": share(demo, kh), "key_holder": True} for kh in ("kh1", "kh2")})
    records, params, _ = run_in_threads(demo, opts)
    assert [r.contributors for r in records] == [3, 3] and not any(r.skipped for r in records)
    assert np.abs(params - plaintext(small_digits(), 2)).max() < 1e-3
    log = (demo.root / "server.log").read_text()
    assert '"members": [1, 2]' in log and "key_holders_missing" in log and "kh3" in log
    assert "HEFLSEC1" not in log
    from hefl.net.status import render, summarize

    assert "kh3: missing from the committee" in render(summarize(demo.state))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_key_holder_killed_mid_run_does_not_stop_the_run(tmp_path):
    demo = demo_for(tmp_path, rounds=4)
    public = demo.root / "keys" / "public.ctx"
    server = spawn_server(demo)
    clients = [spawn_client(demo, n, "--he-key", str(public)) for n in demo.names]
    holders = {kh: spawn_key_holder(demo, kh, share(demo, kh)) for kh in COMMITTEE}
    procs = [server, *clients, *holders.values()]
    try:
        # kh1 answers round 1's decryption, then dies without a word
        wait_event(demo.state / "server.log", "round_completed", timeout=120, round=1)
        holders["kh1"].send_signal(signal.SIGKILL)
        holders["kh1"].wait(10)
        assert [p.wait(240) for p in [server, *clients]] == [0] * 4
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    s = Store(demo.state, readonly=True)
    run = s.runs()[0]
    records = s.records(run.run_id)
    s.close()
    assert [r.round for r in records] == [1, 2, 3, 4] and not any(r.skipped for r in records)
    log = (demo.state / "server.log").read_text()
    assert '"members": [2, 3]' in log  # after the kill, the other two decrypt


class GarblingKeyHolder(FederationClient):
    """A committee member that answers random residues instead of its partial decryption."""

    def _decode(self, h, body, transport):
        real = self.holder.partial

        def garbled(run_id, round_num, request, members):
            part = ThresholdPartial.from_bytes(self.holder.holder.spec,
                                               real(run_id, round_num, request, members))
            moduli = np.array(self.holder.holder.share.seal.coeff_moduli, dtype=np.uint64)
            noise = np.random.default_rng().integers(0, 2**40, part.values.shape,
                                                     dtype=np.uint64) % moduli[None, :, None]
            return ThresholdPartial(part.party, part.key_id, part.members, noise).to_bytes()

        self.holder.partial = garbled
        try:
            super()._decode(h, body, transport)
        finally:
            self.holder.partial = real


@pytest.mark.timeout(180)
def test_a_member_answering_garbage_is_named_and_the_round_still_decrypts(tmp_path):
    demo = demo_for(tmp_path, rounds=1)
    public = demo.root / "keys" / "public.ctx"
    opts = {n: {"he_key": public} for n in demo.names}
    opts.update({kh: {"he_key": share(demo, kh), "key_holder": True} for kh in COMMITTEE})
    run = run_in_memory(demo, opts, client_class={"kh2": GarblingKeyHolder})
    records, params = run.finish(120)
    assert [r.contributors for r in records] == [3] and not records[0].skipped
    assert np.abs(params - plaintext(small_digits(), 1)).max() < 1e-3
    suspects = [e for e in events(demo.root / "server.log", "key_holder_suspect")]
    assert [e["key_holders"] for e in suspects] == [["kh2"]]
