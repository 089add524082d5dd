"""Deployment state faults: one server per state dir (StateLock), revoked clients and
min_clients, and changing ``rounds`` of an existing run (extend, shorten, refuse)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from hefl.errors import ConfigError, StateInUse
from hefl.net.store import LOCK_NAME, StateLock, Store
from hefl.net.testing import ROOT, env

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
