"""SQLite state: rounds commit atomically with their checkpoint, never twice or out of order;
a reopened store resumes at the last completed round."""

from __future__ import annotations

import numpy as np
import pytest

from hefl.errors import ConfigError, RoundError
from hefl.net.store import OpenedRun, Store, write_atomic
from hefl.rounds import RoundRecord


def rec(r: int, **kw) -> RoundRecord:
    return RoundRecord(r, 3, 3, 10.0, 0.5, metrics={"test_accuracy": 0.1 * r}, **kw)


def test_resume_point_and_records_survive_reopen(tmp_path):
    s = Store(tmp_path, keep_checkpoints=2)
    opened = s.open_run("r", {"a": 1}, rounds=3, initial=np.zeros(4), opt_state=b"s0")
    assert not opened and (opened.outcome, opened.previous_rounds) == ("created", None)
    assert s.resume_point("r")[0] == 0
    for r in (1, 2, 3):
        s.commit_round("r", rec(r, rejected={"c2": "straggler"}), np.full(4, r), f"s{r}".encode())
    s.close()
    s = Store(tmp_path)
    opened = s.open_run("r", {"a": 1}, rounds=3, initial=np.zeros(4), opt_state=b"")
    assert opened and (opened.outcome, opened.completed) == ("resumed", 3)
    last, params, state = s.resume_point("r")
    assert (last, params.tolist(), state) == (3, [3.0] * 4, b"s3")
    records = s.records("r")
    assert [r.round for r in records] == [1, 2, 3]
    assert records[0].rejected == {"c2": "straggler"}
    assert records[2].metrics["test_accuracy"] == pytest.approx(0.3)
    n = s.db.execute("SELECT COUNT(*) FROM checkpoints WHERE run_id='r'").fetchone()[0]
    assert n == 2  # older checkpoints pruned
    rows = s.db.execute("SELECT name FROM metrics WHERE round=1 ORDER BY name").fetchall()
    assert ("test_accuracy",) in rows and ("train_loss",) in rows


def test_changing_rounds_extends_or_shortens_the_run_and_never_drops_history(tmp_path):
    s = Store(tmp_path)
    first = s.open_run("r", {"rounds": 2, "seed": 0}, rounds=2, initial=np.zeros(2),
                       opt_state=b"s0")
    assert (bool(first), first.existed, first.message) == (False, False,
                                                           "run r created with 2 rounds")
    for r in (1, 2):
        s.commit_round("r", rec(r), np.full(2, r), f"s{r}".encode())
    s.set_status("r", "finished")

    more = s.open_run("r", {"rounds": 3, "seed": 0}, rounds=3, initial=np.zeros(2),
                      opt_state=b"ignored")
    assert more == OpenedRun("r", "extended", 3, previous_rounds=2, completed=2, reopened=True)
    assert bool(more) and more.existed
    assert more.message == ("run r extended from 2 to 3 rounds; continues after round 2 "
                            "(it had finished)")
    (info,) = s.runs()
    assert (info.rounds, info.status, info.config) == (3, "running", {"rounds": 3, "seed": 0})
    last, params, state = s.resume_point("r")
    assert (last, params.tolist(), state) == (2, [2.0, 2.0], b"s2")  # not round 0 again
    s.commit_round("r", rec(3), np.full(2, 3), b"s3")

    again = s.open_run("r", {}, rounds=5, initial=np.zeros(2), opt_state=b"")
    assert (again.outcome, again.previous_rounds, again.reopened) == ("extended", 3, False)
    fewer = s.open_run("r", {}, rounds=4, initial=np.zeros(2), opt_state=b"")
    assert (fewer.outcome, fewer.previous_rounds, fewer.completed) == ("shortened", 5, 3)
    assert fewer.message == "run r shortened from 5 to 4 rounds; continues after round 3"

    with pytest.raises(ConfigError) as e:
        s.open_run("r", {}, rounds=2, initial=np.zeros(2), opt_state=b"")
    assert "run 'r' has already completed 3 rounds, more than rounds = 2" in str(e.value)
    assert "Set rounds to 3 or more to keep this run" in str(e.value)
    assert s.completed_rounds("r") == [1, 2, 3] and s.runs()[0].rounds == 4  # untouched

    s.set_status("r", "finished")
    done = s.open_run("r", {}, rounds=3, initial=np.zeros(2), opt_state=b"")
    assert done.message == "run r shortened from 4 to 3 rounds; all 3 are already completed"
    assert not done.reopened and s.runs()[0].status == "finished"
    s.close()
    s = Store(tmp_path)  # durable
    assert s.open_run("r", {}, rounds=3, initial=np.zeros(2), opt_state=b"").outcome == "resumed"
    assert s.open_run("other", {}, rounds=1, initial=np.ones(2), opt_state=b"").outcome == "created"


def test_a_round_is_never_repeated_or_skipped(tmp_path):
    s = Store(tmp_path)
    s.open_run("r", {}, rounds=3, initial=np.zeros(2), opt_state=b"")
    s.commit_round("r", rec(1), np.ones(2), b"")
    with pytest.raises(RoundError, match="does not follow"):
        s.commit_round("r", rec(1), np.ones(2), b"")
    with pytest.raises(RoundError, match="does not follow"):
        s.commit_round("r", rec(3), np.ones(2), b"")
    assert s.completed_rounds("r") == [1] and s.resume_point("r")[1].tolist() == [1.0, 1.0]


def test_failed_transaction_leaves_nothing_behind(tmp_path):
    s = Store(tmp_path)
    s.open_run("r", {}, rounds=2, initial=np.zeros(2), opt_state=b"")
    bad = RoundRecord(1, 1, 1, 1.0, None, metrics={"x": "not a number"})  # type: ignore[dict-item]
    with pytest.raises(Exception):  # noqa: B017 - sqlite or RoundError; the point is the rollback
        s.commit_round("r", bad, np.ones(2), b"")
    assert s.completed_rounds("r") == [] and s.resume_point("r")[0] == 0


def test_clients_and_readonly_status(tmp_path):
    with pytest.raises(ConfigError, match="no hefl state"):
        Store(tmp_path / "missing", readonly=True)
    s = Store(tmp_path)
    s.open_run("r", {}, rounds=1, initial=np.zeros(1), opt_state=b"")
    s.register_clients("r", [("a", False), ("b", True)])
    s.client_event("r", "a", "joined")
    ro = Store(tmp_path, readonly=True)
    assert [(c["name"], c["revoked"], c["last_event"]) for c in ro.clients("r")] == [
        ("a", False, "joined"), ("b", True, None)]


def test_write_atomic(tmp_path):
    p = write_atomic(tmp_path / "sub" / "f.txt", "one")
    write_atomic(p, b"two")
    assert p.read_text() == "two" and [x.name for x in p.parent.iterdir()] == ["f.txt"]
