"""The Ray backend gives the sequential backend's results (local Ray instance, 2 CPUs)."""

from __future__ import annotations

import sys

import pytest

from hefl.backends import make_runner
from hefl.errors import ConfigError
from hefl.workloads import w1


def test_missing_ray_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    w = w1("a")
    with pytest.raises(ConfigError, match=r"pip install 'hefl\[ray\]'"):
        make_runner(w.model, w.data, "ray")


RAY_SCRIPT = """
import json, sys
import numpy as np, ray, torch
from hefl.algorithms import fedavg
from hefl.backends import make_runner
from hefl.simulation import run
from hefl.workloads import w1

torch.set_num_threads(1)
w = w1("b")
algo = fedavg(client_lr=w.client_lr, batch_size=w.batch_size)
seq = run(make_runner(w.model, w.data, "sequential"), w.model.init_vector(), algo, rounds=3,
          clients_per_round=w.clients_per_round)
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    with make_runner(w.model, w.data, "ray") as runner:
        actors = len(runner.actors)
        res = run(runner, w.model.init_vector(), algo, rounds=3,
                  clients_per_round=w.clients_per_round)
        bad = runner.fit([0, "nope"], res.params, {0: None, "nope": None})
        evals = runner.evaluate([1, 2], res.params)
finally:
    ray.shutdown()
print(json.dumps({
    "actors": actors,
    "max_diff": float(np.abs(seq.params - res.params).max()),
    "contributors": [[r.contributors for r in h.history.records] for h in (res, seq)],
    "bad_all_exceptions": all(isinstance(v, Exception) for v in bad.values()),
    "eval_n": evals[1].num_examples,
    "data_n": len(w.data[1]),
}))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_same_model_as_sequential():
    """Ray runs in a child process: its runtime (and its gRPC threads) never share the test
    process with the suite's own gRPC servers."""
    pytest.importorskip("ray")
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", RAY_SCRIPT], capture_output=True, text=True, timeout=280,
        cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["actors"] == 2
    # Same code, seeds and thread count in another process: bit-for-bit in practice; allow
    # float rounding in case the worker's math library differs.
    assert out["max_diff"] < 1e-6
    assert out["contributors"][0] == out["contributors"][1]
    assert out["bad_all_exceptions"]  # reported, not fatal
    assert out["eval_n"] == out["data_n"]
