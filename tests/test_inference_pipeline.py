"""The bank pipeline end to end on a subset: selection, federated LR, encrypted scoring."""


import numpy as np
import pytest

from hefl.aggregation import PlainAggregator
from hefl.analytics import VariableSpec, pooled_stats, select_variables
from hefl.data.tabular import load_bank, shared_data, stratified_split
from hefl.inference.pipeline import PipelineConfig, encrypted_aggregator, run_pipeline

BANK = shared_data("bank_marketing", "bank-full.csv.gz")
pytestmark = pytest.mark.skipif(not BANK.is_file(), reason=f"bank marketing data not at {BANK}")


@pytest.fixture(scope="module")
def bank():
    t = load_bank(BANK)
    return t.take(np.arange(0, len(t), 3))  # 15,071 rows keep the test quick


@pytest.fixture(scope="module")
def plain_run(bank):
    return run_pipeline(bank, PlainAggregator, PipelineConfig(rounds=5))


def test_pipeline_selection_equals_pooled_plaintext(bank, plain_run):
    labels = (bank["y"] == "yes").astype(int)
    tr, _ = stratified_split(labels, 0.2, 0)
    train = bank.take(tr)
    spec = VariableSpec.from_schema(train.take(np.arange(2000)), "y", "yes")
    spec = VariableSpec(spec.target, spec.positive, spec.numeric,
                        {k: tuple(sorted(set(bank[k]))) for k in spec.categorical})
    assert plain_run.selected == select_variables(pooled_stats(train, spec), 0.1)
    assert plain_run.parties == 12 and 0 < len(plain_run.selected) < 15


def test_pipeline_encrypted_scoring_equals_plaintext(plain_run):
    r = plain_run
    assert r.accuracy_encrypted == r.accuracy_plain
    assert abs(r.auc_encrypted - r.auc_plain) < 1e-5
    assert r.auc_plain > 0.7  # the federated model is a real model, not a constant
    assert r.accuracy_plain >= 0.88


def test_pipeline_with_encrypted_aggregation(bank, plain_run):
    r = run_pipeline(bank, encrypted_aggregator(), PipelineConfig(rounds=5))
    assert r.selected == plain_run.selected
    assert r.accuracy_encrypted == r.accuracy_plain
    assert abs(r.auc_encrypted - r.auc_plain) < 1e-5
    # encrypted aggregation trains the same model up to its quantization error
    np.testing.assert_allclose(r.params, plain_run.params, atol=1e-3)
