"""A partly filled batch packs several features per ciphertext: same logits, fewer ciphertexts."""

import numpy as np
import pytest

from hefl.crypto.scoring import (
    LR_FAST_PARAMS,
    LR_PARAMS,
    MLP_PARAMS,
    Evaluator,
    Keyring,
    feature_blocks,
    pack_blocks,
)
from hefl.errors import ConfigError, ContextMismatch
from hefl.inference import LinearModel, score_encrypted


def _data(n, d, seed=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), LinearModel(rng.standard_normal(d), 0.7)


@pytest.fixture(scope="module")
def keys():
    kr = Keyring.generate(LR_PARAMS)
    return kr, Evaluator(kr.evaluation_keys())


def test_blocks_fill_the_slots_of_a_small_batch_only():
    cap = LR_PARAMS.records_per_ciphertext
    assert feature_blocks(cap, 50, LR_PARAMS) == 1  # a full batch: one feature per ciphertext
    assert feature_blocks(cap // 2 + 1, 50, LR_PARAMS) == 1
    assert feature_blocks(cap // 2, 50, LR_PARAMS) == 2
    assert feature_blocks(851, 50, LR_PARAMS) == 4  # W5's last batch: 13 ciphertexts, not 50
    assert feature_blocks(1, 50, LR_PARAMS) == 64  # never beyond the next power of two >= d
    assert feature_blocks(1, 1, LR_PARAMS) == 1
    assert feature_blocks(10, 50, MLP_PARAMS) == 1  # the MLP needs one feature per ciphertext


def test_packing_puts_each_record_in_its_own_group_of_slots():
    x = np.arange(12.0).reshape(4, 3) + 1  # 4 records, 3 features
    rows = pack_blocks(x, 4, LR_PARAMS)
    assert rows.shape == (1, LR_PARAMS.records_per_ciphertext)
    half = LR_PARAMS.poly_modulus_degree // 2
    # real parts: record i's features in slots 4i .. 4i+2, slot 4i+3 empty
    np.testing.assert_array_equal(rows[0, :16], [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 10, 11,
                                                 12, 0])
    assert not rows[0, 16:half].any() and not rows[0, half:].any()


@pytest.mark.parametrize(("params", "atol"), [(LR_PARAMS, 1e-5), (LR_FAST_PARAMS, 1e-4)])
def test_packed_batch_scores_like_plaintext(params, atol):
    x, model = _data(300, 6)
    kr = Keyring.generate(params)
    ev = Evaluator(kr.evaluation_keys())
    k = kr.blocks_for(len(x), x.shape[1])
    assert k == 8
    blobs = kr.encrypt_batch(x, blocks=k)
    assert len(blobs) == 1
    z = kr.decrypt_scores(ev.linear(blobs, model.coef, model.intercept, len(x)), len(x), k)
    np.testing.assert_allclose(z, model.logits(x), atol=atol)


def test_one_feature_per_ciphertext_is_still_accepted_and_wrong_counts_are_not(keys):
    kr, ev = keys
    x, model = _data(100, 5)
    z = kr.decrypt_scores(ev.linear(kr.encrypt_batch(x), model.coef, model.intercept, len(x)),
                          len(x))
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    k = kr.blocks_for(len(x), 5)
    packed = kr.encrypt_batch(x, blocks=k)
    with pytest.raises(ContextMismatch, match="feature ciphertexts"):
        ev.linear(packed + packed, model.coef, model.intercept, len(x))
    with pytest.raises(ContextMismatch, match="feature ciphertexts"):  # layout needs records
        ev.linear(packed, model.coef, model.intercept)
    with pytest.raises(ConfigError, match="blocks_for"):
        kr.encrypt_batch(np.zeros((3000, 5)), blocks=2)  # 3000 records do not fit 2048 slots


def test_score_encrypted_packs_the_last_batch(keys):
    kr, _ = keys
    x, model = _data(4096 + 300, 6)
    z, t = score_encrypted(model, x, keyring=kr)
    np.testing.assert_allclose(z, model.logits(x), atol=1e-5)
    _, t_full = score_encrypted(model, x[:4096], keyring=kr)
    # the 300-record batch costs one ciphertext instead of six
    assert t.bytes_up < t_full.bytes_up * (1 + 1.5 / 6)
