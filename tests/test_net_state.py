"""Deployment state faults: one server per state dir (StateLock), revoked clients and
min_clients, and changing ``rounds`` of an existing run (extend, shorten, refuse)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hefl.algorithms import fedavg
from hefl.data.federated import FederatedData
from hefl.errors import ConfigError, StateInUse
from hefl.models.linear import LogisticRegressionModel
from hefl.net.config import load_config
from hefl.net.status import render, summarize
from hefl.net.store import LOCK_NAME, StateLock, Store
from hefl.net.testing import ROOT, env, events, make_demo, run_in_threads
from hefl.rounds import RoundRecord, sample_clients
from hefl.simulation import simulate

# ---------------------------------------------------------------- fault 4: the state-dir lock


def test_lock_refuses_a_second_holder_in_this_process_and_names_the_first(tmp_path):
    state = tmp_path / "state"  # created by the lock
    first = StateLock(state, "127.0.0.1:5000")
    assert first.held
    lock_file = state / LOCK_NAME
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    rec = json.loads(lock_file.read_text())
    assert rec["address"] == "127.0.0.1:5000" and rec["pid"] == os.getpid()
    with pytest.raises(StateInUse) as e:
        StateLock(state, "127.0.0.1:5001")  # a second open file description conflicts
    msg = str(e.value)
    assert f"state dir {str(state)!r} is in use by the server at 127.0.0.1:5000" in msg
    assert f"(pid {os.getpid()})" in msg and "stop it or use another state_dir" in msg
    assert isinstance(e.value, ConfigError)  # the CLI reports it like any bad setting
    assert (e.value.address, e.value.pid) == ("127.0.0.1:5000", os.getpid())
    first.set_address("127.0.0.1:40123")  # e.g. the port bound for HOST:0
    with pytest.raises(StateInUse, match="server at 127.0.0.1:40123"):
        StateLock(state, "x")
    first.release()
    first.release()  # idempotent
    assert not first.held and lock_file.read_text() == ""  # no stale holder left behind
    second = StateLock(state, "127.0.0.1:5001")
    assert json.loads(lock_file.read_text())["address"] == "127.0.0.1:5001"
    second.close()
    first.acquire()  # the same object can take it again
    assert first.held
    first.release()


def test_lock_as_context_manager_and_beside_the_store(tmp_path):
    with StateLock(tmp_path, "127.0.0.1:5000") as lock:
        assert lock.held
        store = Store(tmp_path)  # the database is not affected by the lock file
        store.close()
        with pytest.raises(StateInUse, match="127.0.0.1:5000"):
            StateLock(tmp_path, "127.0.0.1:5001")
    assert not lock.held
    with pytest.raises(RuntimeError), StateLock(tmp_path, "a"):
        raise RuntimeError("boom")  # released on the way out of an exception too
    StateLock(tmp_path, "b").release()


def test_lock_file_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="cannot open the lock file"):
        StateLock(tmp_path, "a")


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env(),
                            cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


HOLD = """
    import sys, time
    from hefl.net.store import StateLock
    lock = StateLock(sys.argv[1], "127.0.0.1:6000")
    print("locked", flush=True)
    time.sleep(120)
"""

TRY = """
    import sys
    from hefl.errors import StateInUse
    from hefl.net.store import StateLock
    try:
        StateLock(sys.argv[1], "127.0.0.1:6001")
    except StateInUse as e:
        print(e)
        sys.exit(3)
    print("acquired")
"""


@pytest.mark.timeout(60)
def test_lock_excludes_another_process_and_kill_9_releases_it(tmp_path):
    mine = StateLock(tmp_path, "127.0.0.1:5000")
    other = _python(TRY, str(tmp_path))
    out, _ = other.communicate(timeout=30)
    assert other.returncode == 3, out
    assert "in use by the server at 127.0.0.1:5000" in out and f"pid {os.getpid()}" in out
    mine.release()

    holder = _python(HOLD, str(tmp_path))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateInUse, match=rf"server at 127\.0\.0\.1:6000 \(pid {holder.pid}\)"):
            StateLock(tmp_path, "127.0.0.1:5000")
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # The killed holder never released it; the kernel did. Its record is stale but harmless.
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = StateLock(tmp_path, "127.0.0.1:5000")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


# ---------------------------------------------------------------- fault 5: revoked vs min_clients


def write_config(root, *, clients, min_clients, clients_per_round, rounds=2, keyholders=()):
    """A run.toml and registry; ``clients`` maps name -> revoked."""
    reg = [f'[[client]]\nname = "{n}"\ntoken_sha256 = "00"\nrevoked = {str(r).lower()}\n'
           for n, r in clients.items()]
    reg += [f'[[client]]\nname = "{n}"\ntoken_sha256 = "00"\nrole = "keyholder"\n'
            for n in keyholders]
    (root / "reg.toml").write_text("\n".join(reg))
    cfg = root / "run.toml"
    cfg.write_text(f"[run]\nrounds = {rounds}\nclients_per_round = {clients_per_round}\n"
                   f"[server]\nmin_clients = {min_clients}\n"
                   '[clients]\nregistry = "reg.toml"\n[tls]\ninsecure = true\n')
    return cfg


def test_revoked_clients_do_not_count_toward_min_clients(tmp_path):
    three = {"c0": False, "c1": False, "c2": True}
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, clients=three, min_clients=3, clients_per_round=3))
    assert str(e.value) == (
        "min_clients=3 can never be met: 1 of the 3 clients is revoked (c2), leaving 2; "
        "lower min_clients to 2 or less, or set revoked = false for some in the registry")
    cfg = load_config(write_config(tmp_path, clients=three, min_clients=2, clients_per_round=3))
    assert [c.name for c in cfg.clients if c.revoked] == ["c2"]
    with pytest.raises(ConfigError, match="all 3 clients are revoked, so no round can ever run"):
        load_config(write_config(tmp_path, clients=dict.fromkeys(three, True), min_clients=1,
                                 clients_per_round=3))
    # key holders never train: they neither count nor trip the revoked check
    with pytest.raises(ConfigError, match="only 2 clients take part in a round"):
        load_config(write_config(tmp_path, clients={"c0": False, "c1": False}, min_clients=3,
                                 clients_per_round=3, keyholders=["kh"]))


def test_a_round_that_samples_revoked_clients_must_still_reach_min_clients(tmp_path):
    six = {f"c{i}": i == 0 for i in range(6)}  # c0 revoked; 3 of 6 sampled per round
    rounds_with_c0 = [r for r in range(1, 8) if 0 in sample_clients(6, 3, 0, r)]
    assert rounds_with_c0 == [2, 7]  # the seed-0 draw this test is built on
    ok = load_config(write_config(tmp_path, clients=six, min_clients=3, clients_per_round=3,
                                  rounds=1))  # round 1 samples three non-revoked clients
    assert ok.server.min_clients == 3
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, clients=six, min_clients=3, clients_per_round=3,
                                 rounds=7))
    assert str(e.value).startswith(
        "min_clients=3 can never be met in round 2 and 1 other round(s): of the 3 clients it "
        "samples, 1 is revoked (c0); lower min_clients to 2 or less")
    load_config(write_config(tmp_path, clients=six, min_clients=2, clients_per_round=3, rounds=7))


# ---------------------------------------------------------------- fault 6: changing rounds


def test_run_id_ignores_rounds_but_not_what_decides_the_result(tmp_path):
    two = {"c0": False, "c1": False}
    cfg = write_config(tmp_path, clients=two, min_clients=1, clients_per_round=2, rounds=2)
    base = load_config(cfg)
    cfg.write_text(cfg.read_text().replace("rounds = 2", "rounds = 3"))
    longer = load_config(cfg)
    assert longer.rounds == 3 and longer.run_id == base.run_id
    assert dataclasses.replace(base, seed=1).run_id != base.run_id
    assert dataclasses.replace(base, model={"kind": "logreg"}).run_id != base.run_id
    assert dataclasses.replace(base, algorithm={"name": "fedprox"}).run_id != base.run_id
    assert dataclasses.replace(base, clients=base.clients[:1]).run_id != base.run_id


def test_status_shows_the_extended_rounds(tmp_path):
    s = Store(tmp_path)
    s.open_run("t-1", {"rounds": 2}, rounds=2, initial=np.zeros(2), opt_state=b"")
    for r in (1, 2):
        s.commit_round("t-1", RoundRecord(r, 2, 2, 4.0, 0.5), np.full(2, r), b"")
    s.set_status("t-1", "finished")
    assert "run t-1: finished, 2/2 rounds" in render(summarize(tmp_path))
    s.open_run("t-1", {"rounds": 3}, rounds=3, initial=np.zeros(2), opt_state=b"")
    info = summarize(tmp_path)
    assert len(info["runs"]) == 1 and "run t-1: running, 2/3 rounds" in render(info)
    s.close()


def three_clients() -> FederatedData:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(45, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 2] > 0).astype(np.int64)
    return FederatedData.from_indices(x, y, [range(i, 45, 3) for i in range(3)])


@pytest.mark.timeout(120)
def test_raising_rounds_of_a_finished_run_continues_it(tmp_path):
    """The unchanged server, restarted with rounds 2 -> 3, runs round 3 only, and the result is
    the 3-round simulation (no second run from round 0 beside the first)."""
    data = three_clients()
    demo = make_demo(tmp_path, data, model={"kind": "logreg", "n_features": 4, "n_classes": 2},
                     rounds=2, clients_per_round=3, server={"min_clients": 3})
    records, _, _ = run_in_threads(demo)
    assert [r.round for r in records] == [1, 2]
    demo.config.write_text(demo.config.read_text().replace("rounds = 2", "rounds = 3"))
    records, params, _ = run_in_threads(demo)
    assert [r.round for r in records] == [1, 2, 3]
    (run,) = summarize(demo.state)["runs"]
    assert (run["status"], run["rounds_completed"], run["rounds"]) == ("finished", 3, 3)
    resumed = events(tmp_path / "server.log", "resumed")
    assert [e["last_completed_round"] for e in resumed] == [2]
    ref = simulate(LogisticRegressionModel(4, 2), data, fedavg(), rounds=3, clients_per_round=3)
    np.testing.assert_allclose(params, ref.params, rtol=0, atol=1e-6)
