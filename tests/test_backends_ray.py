"""The Ray backend gives the sequential backend's results (local Ray instance, 2 CPUs)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from hefl.algorithms import fedavg
from hefl.errors import ConfigError
from hefl.simulation import make_runner, run
from hefl.workloads import w1


def test_missing_ray_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    w = w1("a")
    with pytest.raises(ConfigError, match=r"pip install 'hefl\[ray\]'"):
        make_runner(w.model, w.data, "ray")


@pytest.mark.slow
def test_ray_same_model_as_sequential():
    ray = pytest.importorskip("ray")
    import torch

    torch.set_num_threads(1)
    w = w1("b")
    algo = fedavg(client_lr=w.client_lr, batch_size=w.batch_size)
    seq = run(
        make_runner(w.model, w.data, "sequential"),
        w.model.init_vector(),
        algo,
        rounds=3,
        clients_per_round=w.clients_per_round,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with make_runner(w.model, w.data, "ray") as runner:
            assert len(runner.actors) == 2
            res = run(
                runner,
                w.model.init_vector(),
                algo,
                rounds=3,
                clients_per_round=w.clients_per_round,
            )
            bad = runner.fit([0, "nope"], res.params, {0: None, "nope": None})
            evals = runner.evaluate([1, 2], res.params)
    finally:
        ray.shutdown()
    # Same code, seeds and thread count in another process: bit-for-bit in practice; allow
    # float rounding in case the worker's math library differs.
    assert np.abs(seq.params - res.params).max() < 1e-6
    assert [r.contributors for r in res.history.records] == [
        r.contributors for r in seq.history.records
    ]
    assert all(isinstance(v, Exception) for v in bad.values())  # reported, not fatal
    assert evals[1].num_examples == len(w.data[1])
