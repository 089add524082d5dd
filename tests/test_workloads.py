"""W2 (FEMNIST by writer) and W3 (Shakespeare by role) workload builders, on the real data
(skipped where ../shared/data is absent), and their bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import need_data
from hefl.algorithms import fedavg
from hefl.backends import make_runner
from hefl.backends.vectorized import VectorizedRunner
from hefl.client import FitConfig
from hefl.data.loaders import PAD, SHAKESPEARE_VOCAB
from hefl.errors import ConfigError, DataError
from hefl.workloads import femnist, shakespeare


def test_w2_femnist_workload_and_vectorized_cnn_equals_sequential():
    w = femnist(need_data("femnist_leaf"))
    assert (w.client_lr, w.batch_size, w.clients_per_round, w.rounds) == (0.06, 20, 10, 100)
    assert len(w.data) == 105
    assert len(w.test) == sum(len(d) for d in w.data.test.values()) == 1677
    assert w.model.spec.size == 6_603_710  # the LEAF CNN
    # Two writers' local epoch, sequential vs vectorized: the CNN under vmap gives the same model.
    # Proven in float64, where the two paths differ only by summation order (~1e-16 relative per
    # operation, ~1e-13 after an epoch): in float32 the convolution kernels of oneDNN/MKL differ
    # between CPUs (AVX2 vs AVX-512), and a 6.6 M-parameter CNN amplifies that to ~1e-4.
    model = w.model.astype(torch.float64)
    ids = list(w.data.ids[:2])
    cfg = fedavg(client_lr=w.client_lr, batch_size=w.batch_size).client
    configs = {
        cid: FitConfig(round=1, lr=cfg.lr, epochs=1, batch_size=cfg.batch_size, seed=i)
        for i, cid in enumerate(ids)
    }
    init = model.init_vector()
    seq = make_runner(model, w.data, "sequential").fit(ids, init, configs)
    vec = make_runner(model, w.data, "vectorized")
    assert isinstance(vec, VectorizedRunner)
    out = vec.fit(ids, init, configs)
    for cid in ids:
        assert out[cid].params.dtype == np.float64
        assert np.abs(out[cid].params - seq[cid].params).max() < 1e-9
        assert out[cid].metrics["loss"] == pytest.approx(seq[cid].metrics["loss"], rel=1e-12)
        assert np.abs(out[cid].params - init).max() > 1e-4  # it trained


def test_w3_shakespeare_workload_trains_one_role():
    w = shakespeare(need_data("shakespeare_tff"), test_limit=50)
    assert (w.clients_per_round, w.batch_size) == (10, 10)
    assert len(w.data) == 715 and len(w.test) == 50
    assert w.model.ignore_index == PAD
    cid = w.data.ids[0]
    d = w.data[cid]
    assert d.x.shape[1] == 80 and int(d.x.max()) < SHAKESPEARE_VOCAB
    before = w.model.evaluate(w.model.init_vector(), d)
    cfg = FitConfig(round=1, lr=w.client_lr, epochs=1, batch_size=w.batch_size)
    res = make_runner(w.model, w.data, "sequential").fit([cid], w.model.init_vector(), {cid: cfg})
    after = w.model.evaluate(res[cid].params, d)
    assert after["loss"] < before["loss"]  # one local epoch lowers its own loss


def test_w2_w3_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        femnist(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="test_limit"):
        shakespeare(tmp_path, test_limit=0)
    with pytest.raises(DataError, match="not found"):
        shakespeare(tmp_path)
