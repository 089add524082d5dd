"""Differential privacy deployed (``[privacy]`` in run.toml, ``hefl.net.privacy``), over the
in-memory transport: each party enforces its part of the plan from what it holds, so a server
that lies (drops the announcement, shrinks the sum) gets no less noise than the plan says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hefl.crypto import KeyShare, make_spec
from hefl.crypto.secure_sum import check_unit_weights
from hefl.crypto.spec import dp_share_units
from hefl.errors import ConfigError, CryptoError
from hefl.net.client import FederationClient
from hefl.net.config import load_config
from hefl.net.coordinator import Coordinator
from hefl.net.privacy import run_plan
from hefl.net.proto import hefl_pb2 as pb
from hefl.net.status import render, summarize
from hefl.net.store import Store
from hefl.net.testing import events, make_demo, run_in_memory
from tests.test_attack_server import LOGREG, edit, options, toy_data

BFV = {"kind": "bfv", "custody": "keyholder", "bits": 16}
N = 4


def dp_demo(tmp_path, privacy, aggregation=BFV, rounds=1, **server):
    return make_demo(tmp_path, toy_data(N), model=LOGREG, rounds=rounds, clients_per_round=N,
                     tls=False, aggregation=aggregation, key_holders=["kh"], privacy=privacy,
                     server={"min_clients": 2, "max_attempts": 2, "retry_delay_s": 0.0,
                             **server})


class Recording(FederationClient):
    """An honest client that also keeps what it handed its encoder (delta, weight) per round,
    after DP's clipping: the exact sum the test compares the released one with."""

    def _prepare(self, join):
        super()._prepare(join)
        if getattr(self, "encoder", None) is None or not hasattr(self.encoder, "inner"):
            return
        inner, self.sent = self.encoder.inner, getattr(self, "sent", [])

        class Tap:
            def encode(tap, cid, delta, weight):
                self.sent.append((np.array(delta, dtype=np.float64), weight))
                return inner.encode(cid, delta, weight)

            def __getattr__(tap, name):
                return getattr(inner, name)

        self.encoder.inner = Tap()


class Quiet(Coordinator):
    """A lying server: it announces no DP plan to the clients (hoping they send raw weighted
    updates) and keeps what the key holder answered."""

    seen: list

    def join(self, name, req, peer=""):
        import json

        reply = super().join(name, req, peer)
        agg = json.loads(reply.aggregation_json)
        agg.pop("privacy", None)
        reply.aggregation_json = json.dumps(agg)
        return reply

    def remote_decode(self, r, body):
        out = super().remote_decode(r, body)
        self.seen = [*getattr(self, "seen", []), out]
        return out


def released_minus_exact(run) -> tuple[np.ndarray, float]:
    """The server's decrypted sum minus the exact sum of what the clients encoded."""
    mean, weight = run.coordinator.seen[0]
    exact = sum(c.sent[0][0] for n, c in run.clients.items() if n != "kh")
    assert all(c.sent[0][1] == 1.0 for n, c in run.clients.items() if n != "kh")
    return mean * weight - exact, weight


def test_central_noise_is_added_by_the_key_holder_whatever_the_server_says(tmp_path):
    """Central DP, key-holder custody: the keys carry dp_std; a server that hides the plan from
    the clients still gets weight-1 clipped updates (their keys say so) and a sum the key holder
    noised with N(0, dp_std^2) per coordinate before it left."""
    z = 2.0
    demo = dp_demo(tmp_path, {"noise_multiplier": z, "clip": 1.0, "mode": "central"})
    cfg = load_config(demo.config)
    keys = KeyShare.from_bytes((demo.root / "keys" / "share.key").read_bytes())
    plan = run_plan(cfg, keys.spec.size)
    assert keys.spec.dp_std == pytest.approx(plan.key_holder_std(keys.spec), rel=1e-12)
    assert keys.spec.clip_norm == 1.0 and plan.sampling_rate == 1.0
    run = run_in_memory(demo, options(demo, min_clients=2), coordinator_class=Quiet,
                        client_class={n: Recording for n in demo.names})
    records, _ = run.finish()
    diff, weight = released_minus_exact(run)
    assert weight == pytest.approx(N) and not records[0].skipped
    # ||diff||^2 / dp_std^2 is chi-square with d degrees of freedom (plus BFV rounding, below
    # sqrt(d) * clip / Q): outside [0.01 d, 5 d] with probability below 1e-9 for d = 10
    d, std = diff.size, keys.spec.dp_std
    ratio = float(diff @ diff) / std**2
    assert 0.01 * d < ratio < 5 * d, ratio
    # epsilon is recorded per round and shown by `hefl status`
    assert records[0].dp_epsilon == pytest.approx(plan.epsilon(1), rel=1e-12)
    text = render(summarize(demo.state))
    assert f"epsilon={plan.epsilon(1):.4g}" in text and "privacy spent" in text


def test_distributed_noise_comes_from_the_clients_keys(tmp_path):
    """Distributed DP: each client adds Skellam noise from its own key (dp_mu); the released
    sum differs from the exact one by the sum of their noise, in the planned variance."""
    z = 2.0
    demo = dp_demo(tmp_path, {"noise_multiplier": z, "clip": 1.0, "mode": "distributed"})
    keys = KeyShare.from_bytes((demo.root / "keys" / "share.key").read_bytes())
    spec = keys.spec
    plan = run_plan(load_config(demo.config), spec.size)
    assert spec.dp_mu == pytest.approx(plan.dp_mu) and spec.dp_min == plan.min_clients == N
    run = run_in_memory(demo, options(demo, min_clients=2), coordinator_class=Quiet,
                        client_class={n: Recording for n in demo.names})
    run.finish()
    diff, _ = released_minus_exact(run)
    step = spec.clip / spec.quant_max  # one integer unit
    # the noise is Sk(N dp_mu) per coordinate (variance 2 N dp_mu units), plus the rounding
    var = 2 * N * spec.dp_mu * step**2
    ratio = float(diff @ diff) / var
    assert 0.01 * diff.size < ratio < 5 * diff.size, ratio


def test_a_server_that_drops_contributions_below_dp_min_is_refused(tmp_path):
    """The noise of distributed DP is sized for dp_min contributions: a server that sends the
    key holder a sum of fewer (to get a less noisy aggregate of a few victims) is refused, even
    though its own min_clients and the key holder's local policy (2) would allow it."""
    demo = dp_demo(tmp_path, {"noise_multiplier": 2.0, "clip": 1.0, "mode": "distributed"})

    class Dropping(Quiet):
        def remote_decode(self, r, body):
            short = edit(body, lambda req: req.updates.__delitem__(slice(2, None)))
            return super().remote_decode(r, short)

    assert "sized for at least 4" in refusal(demo, Dropping)


def refusal(demo, lying: type[Quiet]) -> str:
    """Run the demo's one round under a lying coordinator; the key holder's refusal, after
    checking that the run trained nothing and no decryption reached the server."""

    class Refused(lying):  # type: ignore[misc, valid-type]
        def remote_decode(self, r, body):
            try:
                return super().remote_decode(r, body)
            except Exception as e:
                self.refused = str(e)
                raise

    run = run_in_memory(demo, options(demo, min_clients=2), coordinator_class=Refused)
    with pytest.raises(Exception):  # noqa: B017 - nothing trained: the only round was refused
        run.finish()
    assert not hasattr(run.coordinator, "seen")  # nothing decrypted reached the server
    return run.coordinator.refused


def test_clients_size_their_noise_for_the_announced_count(tmp_path):
    """Distributed DP with dp_min=2 of 4: the server announces the 4 it waits for, so each
    client adds a quarter of the planned noise (not a half) and the sum of 4 decrypts."""
    demo = dp_demo(tmp_path, {"noise_multiplier": 2.0, "clip": 1.0, "mode": "distributed",
                              "min_clients": 2})
    run = run_in_memory(demo, options(demo, min_clients=2), coordinator_class=Quiet,
                        client_class={n: Recording for n in demo.names})
    run.finish()
    units = {n: c.encoder.inner.dp_units for n, c in run.clients.items() if n != "kh"}
    assert units == {n: dp_share_units(2, N) for n in units} and dp_share_units(2, N) < 4096
    assert len(run.coordinator.seen) == 1


def test_a_server_announcing_more_clients_than_it_sums_is_refused(tmp_path):
    """A server that tells the clients a round has 1000 contributors (so each adds almost no
    noise) and sums the 4 it has: the share slot inside the ciphertext shows the key holder
    that the sum carries a fraction of the planned noise, and it releases nothing."""
    demo = dp_demo(tmp_path, {"noise_multiplier": 2.0, "clip": 1.0, "mode": "distributed",
                              "min_clients": 2})

    class Inflating(Quiet):
        def next_task(self, sess):
            out = super().next_task(sess)
            if out is not None and out[0].kind == pb.TASK_FIT:
                out[0].config.dp_count = 1000
            return out

    assert "it is not released" in refusal(demo, Inflating)


def test_plaintext_central_dp_and_the_budget_stop(tmp_path):
    """Plaintext aggregation: the (trusted) server adds the noise; given a noise multiplier and
    an epsilon budget, the run stops before the round that would pass the budget."""
    demo = dp_demo(tmp_path, {"noise_multiplier": 1.0, "epsilon": 1e6, "clip": 0.5},
                   aggregation={"kind": "plain"}, rounds=4)
    cfg = load_config(demo.config)
    plan = run_plan(cfg, 10)
    budget = (plan.epsilon(2) + plan.epsilon(3)) / 2  # rounds 1 and 2 fit, round 3 does not
    text = demo.config.read_text().replace("epsilon = 1000000.0", f"epsilon = {budget!r}")
    assert text != demo.config.read_text()
    demo.config.write_text(text)
    run = run_in_memory(demo, {n: {} for n in demo.names})
    records, _ = run.finish()
    assert [r.round for r in records] == [1, 2]
    assert records[-1].dp_epsilon == pytest.approx(plan.epsilon(2), rel=1e-9)
    stop = events(demo.root / "server.log", "privacy_budget_reached")
    assert stop and stop[0]["round"] == 3 and "budget" in stop[0]["reason"]
    store = Store(demo.state, readonly=True)
    try:
        assert store.runs()[0].status == "finished"
    finally:
        store.close()


def test_deployment_privacy_errors_say_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="custody \"keyholder\", or mode \"distributed\""):
        dp_demo(tmp_path / "a", {"epsilon": 8}, aggregation={**BFV, "custody": "clients"})
    with pytest.raises(ConfigError, match="only under BFV"):
        dp_demo(tmp_path / "b", {"epsilon": 8, "mode": "distributed"},
                aggregation={"kind": "plain"})
    with pytest.raises(ConfigError, match="which \\[privacy\\] decides"):
        dp_demo(tmp_path / "c", {"epsilon": 8, "clip": 1.0}, aggregation={**BFV, "clip": 2.0})
    with pytest.raises(ConfigError, match="unknown key"):
        dp_demo(tmp_path / "d", {"epsilon": 8, "sigma": 1.0}, aggregation={"kind": "plain"})
    # keys made without the plan: the server refuses to start (they would add no noise)
    demo = dp_demo(tmp_path / "e", {}, aggregation=BFV)
    demo.config.write_text(demo.config.read_text() + "\n[privacy]\nepsilon = 8.0\n")
    with pytest.raises(ConfigError, match="run `hefl keys`"):
        Coordinator(load_config(demo.config))


def test_key_holder_noise_has_the_configured_variance_and_needs_unit_weights():
    """KeyHolder with dp_std: the decrypted sum of zero updates is pure noise N(0, dp_std^2)."""
    from hefl.crypto import EncryptingClient, KeyHolder, SummingServer, key_ceremony

    d, std = 4096, 0.25
    spec = make_spec("bfv", d, custody="keyholder", clip_norm=1.0, dp_std=std, max_weight=8,
                     max_clients=8)
    ceremony = key_ceremony(spec)
    enc = EncryptingClient(ceremony.public)
    server = SummingServer(ceremony.public)
    total = server.aggregate({i: enc.encode(i, np.zeros(d), 1.0) for i in range(2)})
    mean, weight = KeyHolder(ceremony.shares[0], min_clients=2).decode(total)
    noise = mean * weight
    assert weight == 2
    # sample variance of d normals: relative sd sqrt(2/d) = 2.2%; 5 sd
    assert abs(noise.var() / std**2 - 1) < 5 * math.sqrt(2 / d)
    with pytest.raises(Exception, match="weight 1"):
        enc.encode("w", np.zeros(d), 2.0)
    with pytest.raises(CryptoError, match="total weight 5"):
        check_unit_weights(spec, 5.0, 2)
    for custody in ("clients", "threshold"):
        with pytest.raises(ConfigError, match="custody 'keyholder'"):
            make_spec("bfv", d, custody=custody, clip_norm=1.0, dp_std=std)
