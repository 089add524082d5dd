"""Encrypted scoring shared across helper processes: same logits as plaintext and as serial."""

import numpy as np
import pytest

from hefl.crypto.scoring import LR_FAST_PARAMS, LR_PARAMS, Evaluator, Keyring
from hefl.crypto.workers import HelperPool
from hefl.errors import ConfigError, ContextMismatch
from hefl.inference import LinearModel, score_encrypted


def _data(n=700, d=7, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), LinearModel(rng.standard_normal(d), -0.3)


@pytest.fixture(scope="module")
def parallel_keys():
    with Keyring.generate(LR_PARAMS, workers=2) as kr:
        yield kr


@pytest.fixture(scope="module")
def parallel_evaluator(parallel_keys):
    with Evaluator(parallel_keys.evaluation_keys(), workers=2) as ev:
        yield ev


def test_two_processes_score_like_plaintext(parallel_keys, parallel_evaluator):
    x, model = _data()
    assert parallel_keys.workers == 2 and parallel_keys.startup_s > 0
    blobs = parallel_keys.encrypt_batch(x)
    assert len(blobs) == x.shape[1]
    result = parallel_evaluator.linear(blobs, model.coef, model.intercept)
    z = parallel_keys.decrypt_scores(result, len(x))
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    # the helper's ciphertexts load and evaluate in a serial evaluator too
    serial = Evaluator(parallel_keys.evaluation_keys())
    z1 = parallel_keys.decrypt_scores(serial.linear(blobs, model.coef, model.intercept), len(x))
    np.testing.assert_allclose(z1, z, atol=1e-5)


def test_full_ciphertexts_score_like_seeded_ones(parallel_keys, parallel_evaluator):
    x, model = _data(n=50)
    seeded = parallel_keys.encrypt_batch(x)
    full = parallel_keys.encrypt_batch(x, seeded=False)
    assert sum(map(len, full)) > 1.8 * sum(map(len, seeded))  # both halves, not a seed
    z = parallel_keys.decrypt_scores(
        parallel_evaluator.linear(full, model.coef, model.intercept), len(x))
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)


def test_helper_errors_reach_the_caller(parallel_keys, parallel_evaluator):
    x, model = _data(n=20)
    blobs = parallel_keys.encrypt_batch(x)
    other = Keyring.generate(LR_FAST_PARAMS).encrypt_batch(x)
    # the first share is a helper's: its ciphertexts are under other parameters
    with pytest.raises(ContextMismatch, match="do(es)? not load"):
        parallel_evaluator.linear(other[:3] + blobs[3:], model.coef, model.intercept)
    with pytest.raises(ContextMismatch, match="feature ciphertexts"):
        parallel_evaluator.linear(blobs[:-1], model.coef, model.intercept)
    # and the helpers still work afterwards
    z = parallel_keys.decrypt_scores(
        parallel_evaluator.linear(blobs, model.coef, model.intercept), len(x))
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)


def test_score_encrypted_with_workers_counts_startup_and_matches_plaintext():
    x, model = _data(n=900, d=5)
    z, t = score_encrypted(model, x, workers=2, batch_size=400)
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    assert t.setup_s > 0 and t.us_per_record_with_setup > t.us_per_record


def test_closed_pool_runs_serially_and_bad_worker_counts_are_refused():
    kr = Keyring.generate(LR_PARAMS, workers=2)
    kr.close()
    kr.close()  # idempotent
    assert kr.workers == 1
    x, model = _data(n=30)
    ev = Evaluator(kr.evaluation_keys())
    z = kr.decrypt_scores(ev.linear(kr.encrypt_batch(x), model.coef, model.intercept), len(x))
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="workers"):
            HelperPool(bad, print)


def test_no_helpers_are_spawned_while_a_child_bootstraps(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    pool = HelperPool(2, print)
    assert not pool.parallel and pool.workers == 1
    assert pool.map(max, min, [(1, 2), (3, 4)]) == [1, 3]  # serial: local for every chunk


def test_a_script_without_a_main_guard_can_use_helpers(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import numpy as np\n"
        "from hefl.crypto.scoring import LR_PARAMS, Evaluator, Keyring\n"
        "kr = Keyring.generate(LR_PARAMS, workers=2)\n"
        "x = np.arange(8.0).reshape(4, 2)\n"
        "z = kr.decrypt_scores(Evaluator(kr.evaluation_keys()).linear(\n"
        "    kr.encrypt_batch(x), np.array([1.0, -1.0]), 0.5), 4)\n"
        "print(kr.workers, np.round(z, 4).tolist())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(root), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "[-0.5,", "-0.5,", "-0.5,", "-0.5]"]


def test_map_keeps_chunk_order_and_stays_in_step_after_an_error():
    import operator

    pool = HelperPool(2, int)
    try:
        chunks = [(float(i), 2.0) for i in range(9)]
        assert pool.map(operator.truediv, operator.truediv, chunks) == [i / 2 for i in range(9)]
        with pytest.raises(ZeroDivisionError):
            pool.map(operator.truediv, operator.truediv, [(1.0, 0.0)] * 5)
        assert pool.map(operator.truediv, operator.truediv, chunks) == [i / 2 for i in range(9)]
        assert pool.each(operator.add, 1, 2) == [3]
    finally:
        pool.close()


def test_scoring_service_and_client_share_work_with_helpers_and_stop_them(tmp_path):
    """``hefl infer serve/score --workers 2``: the service's session evaluates with a helper,
    the client encrypts with one; scores match plaintext, and closing or evicting a session
    stops its helper process."""
    import threading

    from hefl.data.tabular import Table
    from hefl.inference.callers import Budget, Quotas
    from hefl.inference.model import ModelFile
    from hefl.inference.server import make_server
    from hefl.inference.service import ScoringClient, ScoringService, score_csv
    from hefl.net.certs import make_federation

    x, model = _data(n=300, d=5)
    header = [f"f{i}" for i in range(5)]
    Table.from_rows(header, [[f"{v:.17g}" for v in row] for row in x]).write_csv(
        tmp_path / "x.csv")
    service = ScoringService(ModelFile(model), workers=2, sessions_per_caller=1)
    fed = make_federation(tmp_path / "certs", ["bank"])
    server = make_server(service, fed.server_cert, fed.server_key, fed.registry, port=0,
                         quotas=Quotas(Budget(), ledger=tmp_path / "usage.jsonl"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ScoringClient(f"https://127.0.0.1:{server.server_address[1]}", fed.ca,
                               token_file=fed.token("bank"))
        seen = []
        real_open = service.open_session

        def spy(bundle, owner=""):
            sid = real_open(bundle, owner)
            seen.append(service._sessions[sid][1])
            return sid

        service.open_session = spy  # type: ignore[method-assign]
        s = score_csv(client, tmp_path / "x.csv", tmp_path / "scores.csv", workers=2,
                      batch_size=100, preprocessing=_identity(header))
        z = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1, usecols=1)
        np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
        assert s.batches == 3 and len(seen) == 1
        assert seen[0]._pool.workers == 1  # the session was closed: its helper stopped
        assert not service._sessions
    finally:
        server.shutdown()
        server.server_close()
        service.close()


def _identity(names):
    """A preprocessing that passes numeric columns through unchanged (mean 0, std 1)."""
    from hefl.data.tabular import Column, Preprocessor

    return Preprocessor("y", "1", tuple(Column(n, "numeric") for n in names))
