"""Encrypted batch scoring: encrypted == plaintext, packing limits, keys, model files."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from hefl.crypto.scoring import (
    LR_PARAMS,
    MLP_PARAMS,
    CkksParams,
    EvaluationKeys,
    Evaluator,
    Keyring,
    split_batches,
)
from hefl.errors import ConfigError, ContextMismatch, TransportError
from hefl.inference import LinearModel, ModelFile, PolyMLP, score_encrypted
from hefl.inference.mlp import train_poly_mlp
from hefl.models.linear import LogisticRegressionModel


def _data(n=600, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y = (x @ w + 0.5 * rng.standard_normal(n) > 0).astype(int)
    return x, y


@pytest.fixture(scope="module")
def lr_keys():
    return Keyring.generate(LR_PARAMS)


def test_lr_encrypted_logits_equal_plaintext(lr_keys):
    x, y = _data()
    model = LinearModel.from_sklearn(LogisticRegression().fit(x, y))
    z, timing = score_encrypted(model, x, keyring=lr_keys)
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    assert ((z > 0) == (model.logits(x) > 0)).all()
    assert timing.records == len(x) and timing.bytes_up > 0 and timing.server_s > 0


def test_hefl_logistic_regression_converts():
    x, y = _data(n=50)
    m = LogisticRegressionModel(x.shape[1])
    rng = np.random.default_rng(1)
    vec = rng.standard_normal(m.spec.size)
    lin = LinearModel.from_hefl(m, vec)
    np.testing.assert_allclose(lin.logits(x), m.decision_function(vec, x))


def test_batch_larger_than_packing_is_split(lr_keys):
    cap = LR_PARAMS.records_per_ciphertext
    rng = np.random.default_rng(2)
    x = rng.standard_normal((cap + 7, 2))
    model = LinearModel(np.array([0.5, -1.25]), 0.1)
    seen = []
    z, _ = score_encrypted(model, x, keyring=lr_keys, on_batch=lambda s, v: seen.append(s))
    assert [s.stop - s.start for s in seen] == [cap, 7]
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    with pytest.raises(ConfigError, match="split"):
        lr_keys.encrypt_batch(x)
    assert split_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


def test_mlp_encrypted_equals_plaintext():
    x, y = _data(n=800, d=5)
    mlp = train_poly_mlp(x, y, hidden=8, epochs=20, lr=3e-2)
    z, _ = score_encrypted(mlp, x)
    ref = mlp.logits(x)
    np.testing.assert_allclose(z, ref, atol=1e-3 * max(1.0, np.abs(ref).max()))
    assert ((z > 0) == (ref > 0)).mean() > 0.999
    assert ((ref > 0) == y).mean() > 0.8  # the trained activation actually learns


def test_ciphertext_under_other_keys_is_detected(lr_keys):
    x, _ = _data(n=20, d=2)
    model = LinearModel(np.array([1.0, 2.0]), 0.0)
    ev = Evaluator(lr_keys.evaluation_keys())
    result = ev.linear(lr_keys.encrypt_batch(x), model.coef, model.intercept)
    other = Keyring.generate(LR_PARAMS)
    with pytest.raises(ContextMismatch, match="other keys"):
        other.decrypt_scores(result, len(x))
    # a ciphertext made under other parameters does not even load
    mlp_keys = Keyring.generate(MLP_PARAMS)
    with pytest.raises(ContextMismatch, match="other parameters"):
        ev.linear(mlp_keys.encrypt_batch(x), model.coef, model.intercept)
    with pytest.raises(ContextMismatch, match="takes 2"):
        ev.linear(lr_keys.encrypt_batch(x[:, :1]), model.coef, model.intercept)


def test_evaluation_keys_roundtrip_and_hold_no_secret(lr_keys):
    ek = lr_keys.evaluation_keys()
    back = EvaluationKeys.loads(ek.dumps())
    assert back == ek and back.relin_keys == back.galois_keys == b""  # LR: no key on the server
    mlp = Keyring.generate(MLP_PARAMS, relin=True).evaluation_keys()
    back = EvaluationKeys.loads(mlp.dumps())
    assert back == mlp and back.relin_keys and back.galois_keys  # relinearization + conjugation
    with pytest.raises(TransportError, match="truncated"):
        EvaluationKeys.loads(mlp.dumps()[: -len(mlp.galois_keys) - 10])
    assert "secret" not in repr(lr_keys)
    with pytest.raises(TransportError):
        EvaluationKeys.loads(b"not a bundle")


def test_parameters_below_128_bit_security_are_refused():
    with pytest.raises(ConfigError, match="128-bit"):
        CkksParams(4096, (60, 40, 40), scale_bits=40)
    for p in (LR_PARAMS, MLP_PARAMS):
        assert sum(p.coeff_mod_bit_sizes) <= {4096: 109, 8192: 218}[p.poly_modulus_degree]


def test_nan_records_are_refused(lr_keys):
    with pytest.raises(ConfigError, match="NaN"):
        lr_keys.encrypt_batch(np.array([[np.nan, 1.0]]))


def test_model_file_roundtrip(tmp_path):
    lin = LinearModel(np.array([0.25, -1.0]), 0.5)
    back = ModelFile.load(ModelFile(lin).save(tmp_path / "m.json")).model
    np.testing.assert_array_equal(back.coef, lin.coef)
    mlp = PolyMLP(np.ones((3, 2)), np.zeros(3), np.ones(3), 0.1)
    back2 = ModelFile.load(ModelFile(mlp).save(tmp_path / "p.json")).model
    x = np.random.default_rng(0).standard_normal((5, 2))
    np.testing.assert_allclose(back2.logits(x), mlp.logits(x))
    (tmp_path / "bad.json").write_text('{"format": "hefl-model/1", "kind": "tree"}')
    with pytest.raises(ConfigError, match="unknown model kind"):
        ModelFile.load(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(
        '{"format": "hefl-model/1", "kind": "logistic", "coef": [NaN], "intercept": 0}')
    with pytest.raises(ConfigError, match="NaN"):
        ModelFile.load(tmp_path / "nan.json")


def test_fast_profile_is_close_and_overflow_is_an_error_not_a_wrong_score():
    x, y = _data(n=300)
    model = LinearModel.from_sklearn(LogisticRegression().fit(x, y))
    z, t_fast = score_encrypted(model, x, profile="fast")
    np.testing.assert_allclose(z, model.logits(x), atol=1e-4)
    _, t_precise = score_encrypted(model, x)
    assert t_fast.bytes_up < t_precise.bytes_up  # one data prime instead of two
    huge = LinearModel(np.full(x.shape[1], 100.0), 0.0)  # logits in the hundreds
    with pytest.raises(ContextMismatch, match="overflow"):
        score_encrypted(huge, x, profile="fast")
    z, _ = score_encrypted(huge, x)  # the precise parameters have 24 bits of headroom
    np.testing.assert_allclose(z, huge.logits(x), rtol=1e-6)
    with pytest.raises(ConfigError, match="profile"):
        score_encrypted(model, x, profile="turbo")
