"""Attacks by a malicious server (and by rogue clients) on encrypted aggregation.

Each test plays the attacker with the real coordinator, clients and key holder over the in-memory
transport: a ``Coordinator`` subclass that alters what it sends the key holder, a client class
that lies. Each asserts the attempt is refused, with its reason, and that the attacker learned
nothing beyond the aggregate of at least ``min_clients`` verified contributions, once per round.
The claims and these tests are listed in docs/threat-model.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from hefl.crypto import EncryptingClient
from hefl.data.federated import FederatedData
from hefl.errors import RoundError
from hefl.net.client import FederationClient
from hefl.net.coordinator import Coordinator, NoKeyHolder
from hefl.net.decrypt import DecodeLedger
from hefl.net.identity import Identity
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.store import Store
from hefl.net.testing import events, make_demo, run_in_memory, run_in_threads, wait_event

LOGREG = {"kind": "logreg", "n_features": 4, "n_classes": 2}
BFV = {"kind": "bfv", "custody": "keyholder", "bits": 16, "clip": 1.0}
VICTIM = "c0"


def toy_data(n: int = 4) -> FederatedData:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20 * n, 4))
    y = (x[:, 0] + x[:, 2] > 0).astype(np.int64)
    parts = FederatedData.from_indices(x, y, [range(20 * i, 20 * (i + 1)) for i in range(n)])
    return FederatedData({f"c{i}": d for i, d in enumerate(parts.train.values())})


def demo_for(tmp_path, rounds=1, n=4, tls=False, aggregation=BFV, **server):
    return make_demo(tmp_path, toy_data(n), model=LOGREG, rounds=rounds, clients_per_round=n,
                     tls=tls, aggregation=aggregation, key_holders=["kh"],
                     server={"min_clients": 2, "max_attempts": 2, "retry_delay_s": 0.0, **server})


def options(demo, min_clients=3, **per_client):
    keys = demo.root / "keys"
    public = "share.key" if demo_custody(demo) == "clients" else "public.ctx"
    opts = {n: {"he_key": keys / public} for n in demo.names}
    opts["kh"] = {"he_key": keys / "share.key", "key_holder": True, "min_clients": min_clients,
                  "state_dir": demo.root / "kh-state"}
    for n, o in per_client.items():
        opts[n] = {**opts[n], **o}
    return opts


def demo_custody(demo) -> str:
    from hefl.net.config import load_config

    return str(load_config(demo.config).aggregation.get("custody"))


def ledger_rounds(demo) -> list[tuple[int, tuple[str, ...]]]:
    """What the key holder decrypted: (round, signers) per decryption."""
    ledger = DecodeLedger(demo.root / "kh-state" / "kh.sqlite")
    try:
        rows = ledger.db.execute("SELECT round, signers FROM decodes ORDER BY round").fetchall()
    finally:
        ledger.close()
    return [(int(r), tuple(s.split(","))) for r, s in rows]


def refusals(demo) -> list[str]:
    return [e["reason"] for e in events(demo.root / "kh.log", "decode_refused")]


def edit(body: bytes, change) -> bytes:
    req = pb.DecodeRequest.FromString(body)
    change(req)
    return req.SerializeToString()


class Tampering(Coordinator):
    """A coordinator that rewrites each decode request with ``self.tamper(round, request)``
    and keeps what the key holder answered or why it refused (the attacker's view)."""

    seen: list

    def tamper(self, r, req):
        raise NotImplementedError

    def remote_decode(self, r, body):
        self.seen = getattr(self, "seen", [])
        forged = edit(body, lambda req: self.tamper(r, req))
        try:
            out = super().remote_decode(r, forged)
        except RoundError as e:
            self.seen.append(("refused", str(e)))
            raise
        self.seen.append(("decrypted", out))
        return out


def run_attack(demo, coordinator_class, opts=None):
    run = run_in_memory(demo, opts or options(demo), coordinator_class=coordinator_class)
    try:
        records, params = run.finish()
    except RoundError:  # every round refused: nothing trained (the records say why)
        store = Store(demo.state, readonly=True)
        records, params = store.records(run.coordinator.run_id), None
        store.close()
    return run, records, params


# ------------------------------------------------------------------ a lying server


def test_sybil_padding_with_the_servers_own_zero_ciphertexts_is_refused(tmp_path):
    """(a) The victim's update padded with encryptions of zero the server made itself (it holds
    the public key): the key holder would 'decrypt a sum of 3' that is the victim's update."""
    demo = demo_for(tmp_path)

    class Sybil(Tampering):
        def tamper(self, r, req):
            victim = next(u for u in req.updates if u.client == VICTIM)
            zero = EncryptingClient(self.summer.public).encode("z", np.zeros(self.size), 1.0)
            fakes = [pb.SignedUpdate(client=name, task_id=victim.task_id, signature=bytes(64),
                                     payload=zero.to_bytes()) for name in ("c1", "c2")]
            del req.updates[:]
            req.updates.extend([victim, *fakes])

    run, records, _ = run_attack(demo, Sybil)
    assert run.coordinator.seen[0][0] == "refused"
    assert "does not carry its valid signature" in run.coordinator.seen[0][1]
    assert records[0].skipped and ledger_rounds(demo) == []  # nothing was decrypted
    assert any("valid signature" in r for r in refusals(demo))


def test_forged_count_and_duplicated_victim_are_refused(tmp_path):
    """(b) A count the server writes: one contribution sent as the sum, or the victim thrice."""
    demo = demo_for(tmp_path, rounds=2)

    class Forger(Tampering):
        def tamper(self, r, req):
            victim = next(u for u in req.updates if u.client == VICTIM)
            del req.updates[:]
            req.updates.extend([victim] if r == 1 else [victim] * 3)

    run, records, _ = run_attack(demo, Forger)
    (k1, why1), (k2, why2) = run.coordinator.seen[:2]
    assert (k1, k2) == ("refused", "refused")
    assert "aggregate of 1 contribution" in why1 and "appears twice" in why2
    assert all(r.skipped for r in records) and ledger_rounds(demo) == []


def test_second_decode_in_a_round_for_differencing_is_refused(tmp_path):
    """(c) Decode the sum of all four, then of the three others: the difference would be the
    victim's update. The key holder answers the first and refuses the second."""
    demo = demo_for(tmp_path)

    class Differencer(Coordinator):
        def remote_decode(self, r, body):
            first = super().remote_decode(r, body)
            others = edit(body, lambda req: [req.updates.remove(u) for u in list(req.updates)
                                             if u.client == VICTIM])
            try:
                self.second = super().remote_decode(r, others)
            except RoundError as e:
                self.second = str(e)
            return first

    run, records, _ = run_attack(demo, Differencer)
    assert records[0].contributors == 4 and not records[0].skipped
    assert isinstance(run.coordinator.second, str) and "already decrypted" in run.coordinator.second
    assert ledger_rounds(demo) == [(1, ("c0", "c1", "c2", "c3"))]


def test_replayed_contributions_of_a_previous_round_are_refused(tmp_path):
    """Round 2 is sent round 1's contributions (relabelled as round 2, and unchanged)."""
    demo = demo_for(tmp_path, rounds=3)

    class Replayer(Coordinator):
        def remote_decode(self, r, body):
            if r == 1:
                self.old = body
                return super().remote_decode(r, body)
            model = pb.DecodeRequest.FromString(body).model_digest

            def relabel(req):  # round 1's updates presented as this round's, on this model
                req.round, req.model_digest = r, model

            replay = self.old if r == 2 else edit(self.old, relabel)
            try:
                return super().remote_decode(r, replay)
            except RoundError as e:
                setattr(self, f"why{r}", str(e))
                raise

    run, records, _ = run_attack(demo, Replayer)
    assert not records[0].skipped and records[1].skipped and records[2].skipped
    assert "names run" in run.coordinator.why2 and "round 1" in run.coordinator.why2
    assert "valid signature" in run.coordinator.why3
    assert [r for r, _ in ledger_rounds(demo)] == [1]


def test_a_server_that_wipes_its_state_cannot_get_a_round_decrypted_twice(tmp_path):
    """A restart with the server's state deleted redoes round 1 with new ciphertexts: the key
    holder remembers (on disk) that it decrypted round 1 of this run and refuses."""
    import shutil

    demo = demo_for(tmp_path)
    run_in_memory(demo, options(demo)).finish()
    shutil.rmtree(demo.state)
    run, records, _ = run_attack(demo, Coordinator)
    assert records[0].skipped and "already decrypted" in records[0].skip_reason
    assert [r for r, _ in ledger_rounds(demo)] == [1]


def test_lost_reply_and_server_restart_get_the_same_answer_again(tmp_path):
    """A server that loses the key holder's reply (or dies right after it) asks again with the
    same, persisted request: the key holder answers it again, identically, and the run
    completes; it decrypted each round exactly once."""
    demo = demo_for(tmp_path, rounds=2)

    class Crashes(Coordinator):
        answers: list = []

        def remote_decode(self, r, body):
            out = super().remote_decode(r, body)
            Crashes.answers.append((r, out))
            if r == 1 and len(Crashes.answers) == 1:  # reply lost: the attempt is retried
                raise NoKeyHolder("reply lost")
            if r == 2 and len([a for a in Crashes.answers if a[0] == 2]) == 1:
                self.request_stop()  # the server dies after the answer, before the commit
                raise NoKeyHolder("server killed")
            return out

    run = run_in_memory(demo, options(demo), coordinator_class=Crashes)
    with pytest.raises(RoundError, match="stopped"):
        run.finish()
    assert (demo.state / "pending").exists() and any((demo.state / "pending").iterdir())
    records, _ = run_in_memory(demo, options(demo), coordinator_class=Crashes).finish()
    assert [r.skipped for r in records] == [False, False]
    (r1a, m1a), (r1b, m1b) = [a for a in Crashes.answers if a[0] == 1]
    np.testing.assert_array_equal(m1a[0], m1b[0])
    assert [r for r, _ in ledger_rounds(demo)] == [1, 2]
    assert events(demo.root / "server.log", "decode_resumed")
    assert not any((demo.state / "pending").iterdir())  # cleared once committed


# ------------------------------------------------------------------ roles


def test_a_data_client_never_answers_decode_and_cannot_pose_as_key_holder(tmp_path):
    """The server sends DECODE to a data client (which in custody "clients" holds the key): the
    client ignores it. A data client that subscribes as key holder, or sends a decoded mean, is
    refused; the global model stays the honest one."""
    demo = demo_for(tmp_path, aggregation={**BFV, "custody": "clients"}, round_timeout_s=1.0)

    class AsksAClient(Coordinator):
        def _key_holders(self):
            return [VICTIM] if VICTIM in self.sessions else []

        def remote_decode(self, r, body):
            try:
                return super().remote_decode(r, body)
            except NoKeyHolder as e:  # give up on the round (no retry): the run ends
                raise RoundError(str(e)) from e

    run = run_in_memory(demo, options(demo), coordinator_class=AsksAClient)
    wait_event(demo.root / f"{VICTIM}.log", "decode_ignored", timeout=30)  # it got the task
    run.advance(2.0)  # delivered, but the data client never answers: the decode times out
    with pytest.raises(RoundError, match=f"{VICTIM!r} did not answer"):
        run.finish()
    assert events(demo.root / f"{VICTIM}.log", "decode_ignored")
    assert run.clients[VICTIM].summary.rounds_decoded == 0

    class PosesAsKeyHolder(FederationClient):
        def _prepare(self, join):
            super()._prepare(join)
            self.holder = object()  # claims the key-holder role when it subscribes

    other = demo_for(tmp_path / "pose")
    pose = run_in_memory(other, options(other), client_class={"c1": PosesAsKeyHolder})
    pose.threads[list(pose.clients).index("c1")].join(30)
    assert "data clients never decrypt" in str(pose.clients["c1"].error)
    pose.coordinator.close()


def test_a_client_that_sends_a_decoded_mean_is_refused(tmp_path):
    demo = demo_for(tmp_path)

    class SetsTheModel(FederationClient):
        def _fit(self, h, body, transport):
            forged = pb.UpdateHeader(run_id=h.run_id, round=h.round, task_id=h.task_id,
                                     kind=pb.TASK_DECODE, metrics={"total_weight": 1.0})
            try:
                transport.submit(forged, np.full(self.model.spec.size, 9.0).tobytes())
            except Exception as e:  # noqa: BLE001 - the refusal is what we assert
                self.forged_refusal = e
            super()._fit(h, body, transport)

    run = run_in_memory(demo, options(demo), client_class={VICTIM: SetsTheModel})
    records, params = run.finish()
    rogue = run.clients[VICTIM]
    assert "no such decode task" in str(rogue.forged_refusal)
    assert not records[0].skipped and np.abs(params).max() < 5.0


# ------------------------------------------------------------------ rogue clients


def test_a_client_signing_with_a_key_not_its_own_is_refused(tmp_path):
    """c1 signs with a fresh key (or c2's if it had stolen it, same thing for the check): the
    server refuses the update with the reason; relabelled by the server as another client's,
    the key holder refuses it too."""
    demo = demo_for(tmp_path)
    Identity.generate().save(tmp_path / "rogue.id")
    run = run_in_memory(demo, options(demo, c1={"identity": tmp_path / "rogue.id"}))
    records, _ = run.finish()
    assert "does not carry c1's valid signature" in records[0].rejected["c1"]
    assert "valid signature" in str(run.clients["c1"].error)
    assert ledger_rounds(demo)[0][1] == ("c0", "c2", "c3")

    relabel = demo_for(tmp_path / "relabel")

    class Relabels(Tampering):
        def tamper(self, r, req):
            req.updates[0].client = "c1"  # c0's update presented as c1's (c1 appears twice)
            req.updates[1].client = "c0"

    run, records, _ = run_attack(relabel, Relabels)
    assert "valid signature" in run.coordinator.seen[0][1] and ledger_rounds(relabel) == []


def test_the_server_learns_no_sample_count_and_no_loss(tmp_path):
    """Encrypted runs: num_examples travels only inside the ciphertext, the loss not at all."""
    demo = demo_for(tmp_path)

    class Spy(Coordinator):
        headers: list = []

        def submit(self, name, h, chunks):
            Spy.headers.append((name, h.num_examples, dict(h.metrics)))
            return super().submit(name, h, chunks)

    records, _ = run_in_memory(demo, options(demo), coordinator_class=Spy).finish()
    fits = [(n, k, m) for n, k, m in Spy.headers if n != "kh"]
    assert len(fits) == 4 and all(k == 1 and m == {} for _, k, m in fits)
    assert records[0].train_loss is None and records[0].total_weight == 80.0  # 4 x 20, decrypted


# ------------------------------------------------------------------ once over gRPC + TLS


@pytest.mark.timeout(120)
def test_sybil_padding_over_grpc_and_tls_is_refused(tmp_path):
    demo = demo_for(tmp_path, tls=True)

    class Sybil(Tampering):
        def tamper(self, r, req):
            victim = next(u for u in req.updates if u.client == VICTIM)
            del req.updates[:]
            req.updates.extend([victim] + [pb.SignedUpdate(
                client=n, task_id=victim.task_id, signature=victim.signature,
                payload=victim.payload) for n in ("c1", "c2")])

    errors: list = []
    records, params, _ = run_in_threads(demo, options(demo), errors=errors,
                                        coordinator_class=Sybil)
    assert records[0].skipped and "valid signature" in records[0].skip_reason
    assert ledger_rounds(demo) == [] and np.allclose(params, 0)


def test_ckks_deployment_publishes_only_flooded_decryptions(tmp_path):
    """CKKS's raw decryption would reveal the secret key to the server that made the sum (Li and
    Micciancio 2021). Deployed with CKKS, the key holder floods every decryption: the server's
    key-recovery algebra on what it is sent matches no key coefficient, and asking twice for the
    same round (hoping to average the noise away) returns the stored answer, bit for bit."""
    from test_attack_ckks_key_recovery import coefficients, recover_key, true_key

    from hefl.crypto import KeyHolder, SummingServer
    from hefl.net.keys import load_key

    demo = demo_for(tmp_path, aggregation={"kind": "ckks", "custody": "keyholder"})

    class Averager(Coordinator):
        seen: list = []

        def remote_decode(self, r, body):
            out = super().remote_decode(r, body)
            Averager.seen.append((body, out, super().remote_decode(r, body)))
            return out

    records, params = run_in_memory(demo, options(demo), coordinator_class=Averager).finish()
    assert not records[0].skipped and np.all(np.isfinite(params))
    body, (mean, weight), (mean2, weight2) = Averager.seen[0]
    np.testing.assert_array_equal(mean, mean2)
    assert weight == weight2
    holder = KeyHolder(load_key(demo.root / "keys" / "share.key"))  # the test's view only
    req = pb.DecodeRequest.FromString(body)
    total = SummingServer(holder.share.public()).aggregate(
        {u.client: bytes(u.payload) for u in req.updates}).payload
    seal = holder.share.seal
    published = seal.encode(np.concatenate([[weight], mean * weight, np.zeros(
        seal.spec.poly_degree - 1 - mean.size)]))
    p = coefficients(published, holder.spec.n_primes * holder.spec.poly_degree)
    candidate = recover_key(seal, seal.ciphertext(total.ciphertexts[0]), p)
    assert sum(a == b for a, b in zip(candidate, true_key(holder), strict=True)) == 0

