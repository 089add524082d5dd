"""Encrypted rounds over the in-memory transport: a client with another federation's keys is
refused with a reason and stops; a rerun of the same encrypted run reproduces the model exactly
(stochastic rounding seeded from the run and the client's own secret)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hefl.data.federated import FederatedData
from hefl.errors import RoundError, TransportError
from hefl.net.config import build_model
from hefl.net.keys import write_keys
from hefl.net.testing import make_demo, run_in_memory

LOGREG = {"kind": "logreg", "n_features": 4, "n_classes": 2}
BFV = {"kind": "bfv", "custody": "keyholder", "bits": 16, "clip": 1.0}


def toy_data() -> FederatedData:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] + x[:, 2] > 0).astype(np.int64)
    parts = FederatedData.from_indices(x, y, [range(0, 20), range(20, 40), range(40, 60)])
    return FederatedData({f"c{i}": d for i, d in enumerate(parts.train.values())})


def encrypted_demo(tmp_path, rounds=2):
    return make_demo(tmp_path, toy_data(), model=LOGREG, rounds=rounds, clients_per_round=3,
                     tls=False, aggregation=BFV, key_holders=["kh"],
                     server={"min_clients": 2})


def options(demo, **per_client):
    keys = demo.root / "keys"
    opts = {n: {"he_key": keys / "public.ctx"} for n in demo.names}
    opts["kh"] = {"he_key": keys / "share.key", "key_holder": True, "min_clients": 2}
    for n, o in per_client.items():
        opts[n] = {**opts[n], **o}
    return opts


def test_client_with_another_federations_key_is_refused_and_stops(tmp_path):
    demo = encrypted_demo(tmp_path / "fed", rounds=1)
    size = build_model(LOGREG).spec.size
    other = write_keys(BFV, size, tmp_path / "other-keys")
    run = run_in_memory(demo, options(demo, c2={"he_key": other.public}))
    records, _ = run.finish()
    assert records[0].contributors == 2
    assert "encrypted under another key" in records[0].rejected["c2"]
    err = run.clients["c2"].error
    assert isinstance(err, TransportError)
    assert "do not belong to this federation" in str(err)
    assert run.clients["c2"].summary.reconnects == 0  # told once, not retried every round


def test_rerun_of_an_encrypted_run_reproduces_the_model_exactly(tmp_path):
    demo = encrypted_demo(tmp_path, rounds=2)
    ledger = {"state_dir": tmp_path / "kh-first"}
    first = run_in_memory(demo, options(demo, kh=ledger)).finish()[1]
    shutil.rmtree(demo.state)
    # the same key holder refuses to decrypt the rounds of this run a second time: a server
    # that wipes its state could otherwise difference two decryptions of one round
    wiped = run_in_memory(demo, options(demo, kh=ledger))
    with pytest.raises(RoundError, match="already decrypted"):
        wiped.finish()
    shutil.rmtree(demo.state)
    # a fresh key holder (an empty ledger) decrypts: stochastic rounding is seeded from the run
    # and each client's secret, so the model is reproduced bit for bit
    second = run_in_memory(demo, options(demo, kh={"state_dir": tmp_path / "kh-new"})).finish()[1]
    assert not np.allclose(first, 0)
    np.testing.assert_array_equal(first, second)
