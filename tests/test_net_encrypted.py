"""Encrypted aggregation deployed: the server holds only the public context, clients encrypt,
a registered key holder (in both custodies; in custody "clients" the data clients also hold the
key, to encrypt) decrypts the sum, after verifying the signed contributions. The result equals the plaintext simulation within the quantization error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hefl.algorithms import fedavg
from hefl.data.federated import FederatedData
from hefl.data.loaders import load_digits
from hefl.data.partition import dirichlet
from hefl.errors import KeyCustodyError
from hefl.models.linear import LogisticRegressionModel
from hefl.net.config import load_config
from hefl.net.server import FederationServer
from hefl.net.store import Store
from hefl.net.testing import (
    make_demo,
    run_in_threads,
    spawn_client,
    spawn_key_holder,
    spawn_server,
)
from hefl.simulation import simulate

MODEL = {"kind": "logreg", "n_features": 64, "n_classes": 10}
BFV = {"kind": "bfv", "custody": "clients", "bits": 16, "clip": 1.0}


def small_digits(take: int = 240) -> FederatedData:
    d = load_digits(0)
    x, y = d.x_train[:take], d.y_train[:take]
    return FederatedData.from_indices(x, y, dirichlet(y, 3, 0.5, 0))


def plaintext(data: FederatedData, rounds: int) -> np.ndarray:
    return simulate(LogisticRegressionModel(64, 10), data, fedavg(), rounds=rounds,
                    clients_per_round=3, seed=0).params


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_encrypted_processes_custody_clients_equal_plaintext(tmp_path):
    data = small_digits()
    demo = make_demo(tmp_path, data, model=MODEL, rounds=3, clients_per_round=3,
                     aggregation=BFV, server={"min_clients": 2}, key_holders=["kh"])
    share = tmp_path / "keys" / "share.key"
    server = spawn_server(demo)
    # the data clients hold the key and encrypt with it, but only the registered key holder
    # decrypts (data clients never answer DECODE); their identity keys default to NAME.id
    # beside the token file
    clients = [spawn_client(demo, n, "--he-key", str(share)) for n in demo.names]
    clients.append(spawn_key_holder(demo, "kh", share))
    try:
        assert [p.wait(120) for p in [server, *clients]] == [0] * 5
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    s = Store(demo.state, readonly=True)
    run = s.runs()[0]
    params, records = s.resume_point(run.run_id)[1], s.records(run.run_id)
    s.close()
    assert [r.contributors for r in records] == [3, 3, 3] and not any(r.skipped for r in records)
    ref = plaintext(data, 3)
    assert np.abs(params - ref).max() < 1e-3
    assert not np.allclose(params, 0)
    # ciphertexts, not float32 vectors, went up: far more than 4 bytes per parameter
    assert records[0].upload_bytes / 3 > 4 * params.size
    log = (demo.state / "server.log").read_text()
    assert "decode_requested" in log and "HEFLSEC1" not in log


@pytest.mark.timeout(120)
def test_keyholder_custody_and_min_clients_refusal(tmp_path):
    data = small_digits()
    agg = {**BFV, "custody": "keyholder"}
    demo = make_demo(tmp_path, data, model=MODEL, rounds=2, clients_per_round=3,
                     aggregation=agg, key_holders=["kh"], server={"min_clients": 3})
    keys = tmp_path / "keys"
    opts = {n: {"he_key": keys / "public.ctx", "workers": 2} for n in demo.names}
    records, params, _ = run_in_threads(
        demo, {**opts, "kh": {"he_key": keys / "share.key", "key_holder": True, "workers": 2}})
    assert [r.contributors for r in records] == [3, 3]
    assert np.abs(params - plaintext(data, 2)).max() < 1e-3

    # a key holder whose policy needs more contributors than the round has refuses to decrypt:
    # the rounds are recorded as skipped and the model is unchanged
    strict = make_demo(tmp_path / "strict", data, model=MODEL, rounds=1, clients_per_round=3,
                       aggregation=agg, key_holders=["kh"], server={"min_clients": 3})
    keys = tmp_path / "strict" / "keys"
    opts = {n: {"he_key": keys / "public.ctx"} for n in strict.names}
    errors: list[BaseException] = []
    records, params, _ = run_in_threads(
        strict, {**opts, "kh": {"he_key": keys / "share.key", "key_holder": True,
                                "min_clients": 4}}, errors=errors)
    assert records[0].skipped and np.allclose(params, 0)
    assert "refusing to decrypt an aggregate of 3" in records[0].skip_reason
    # a run whose every round was skipped trained nothing: the server says so, with the reason
    assert len(errors) == 1 and "nothing was trained" in str(errors[0])
    assert "refusing to decrypt" in str(errors[0])


def test_server_refuses_a_secret_key(tmp_path):
    demo = make_demo(tmp_path, small_digits(60), model=MODEL, rounds=1, clients_per_round=3,
                     aggregation=BFV)
    cfg = load_config(demo.config)
    bad = {**cfg.aggregation, "public": str(tmp_path / "keys" / "share.key")}
    with pytest.raises(KeyCustodyError, match="must never hold it"):
        FederationServer(dataclasses.replace(cfg, aggregation=bad))
    secret = (tmp_path / "keys" / "share.key").read_bytes()
    public = (tmp_path / "keys" / "public.ctx").read_bytes()
    assert secret[-64:] not in public


@pytest.mark.timeout(120)
def test_encrypted_round_sums_only_the_ciphertexts_that_arrived(tmp_path):
    data = small_digits()
    demo = make_demo(tmp_path, data, model=MODEL, rounds=1, clients_per_round=3,
                     aggregation={**BFV, "custody": "keyholder"}, key_holders=["kh"],
                     server={"min_clients": 2, "round_timeout_s": 4.0})
    keys = tmp_path / "keys"
    opts = {n: {"he_key": keys / "public.ctx"} for n in demo.names}
    opts["c2"]["fit_delay_s"] = 6.0  # straggler: its ciphertext misses the round (2 s margins)
    records, params, _ = run_in_threads(
        demo, {**opts, "kh": {"he_key": keys / "share.key", "key_holder": True}})
    r = records[0]
    assert (r.contributors, r.skipped) == (2, False) and "straggler" in r.rejected["c2"]
    two = FederatedData({k: data.train[k] for k in list(data.train)[:2]})
    assert np.abs(params - plaintext(two, 1)).max() < 1e-3
