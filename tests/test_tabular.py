"""CSV loading and the shipped preprocessing: encoding, JSON round trip, bad input."""

import gzip
import json

import numpy as np
import pytest

from hefl.data.tabular import (
    Preprocessor,
    Table,
    load_bank,
    load_german,
    load_taiwan,
    read_csv,
    shared_data,
    stratified_split,
)
from hefl.errors import DataError

SHARED = shared_data()


def _write(path, text):
    path.write_text(text)
    return path


def test_fit_transform_onehot_and_standardise(tmp_path):
    t = read_csv(_write(tmp_path / "a.csv", "age,job,y\n20,a,no\n40,b,yes\n30,a,no\n"))
    pre = Preprocessor.fit(t, target="y")
    assert pre.feature_names == ("age", "job=a", "job=b")
    x = pre.transform(t)
    np.testing.assert_allclose(x[:, 0], (np.array([20, 40, 30]) - 30) / np.std([20, 40, 30]))
    np.testing.assert_array_equal(x[:, 1:], [[1, 0], [0, 1], [1, 0]])
    assert pre.labels(t).tolist() == [0, 1, 0]
    back = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    np.testing.assert_array_equal(back.transform(t), x)


def test_unknown_category_maps_to_zeros_and_is_counted():
    train = Table.from_rows(["c", "y"], [["a", "0"], ["b", "1"]])
    pre = Preprocessor.fit(train, target="y")
    x, unknown = pre.transform_report(Table.from_rows(["c"], [["a"], ["zzz"], ["zzz"]]))
    np.testing.assert_array_equal(x, [[1, 0], [0, 0], [0, 0]])
    assert unknown == {"c": 2}


def test_missing_target_is_a_clear_error(tmp_path):
    t = read_csv(_write(tmp_path / "a.csv", "a,b\n1,2\n"))
    with pytest.raises(DataError, match="target column 'y' is not in the data"):
        Preprocessor.fit(t, target="y")


def test_wrong_column_count_names_the_line(tmp_path):
    with pytest.raises(DataError, match="line 3: 2 fields, the header has 3"):
        read_csv(_write(tmp_path / "a.csv", "a,b,y\n1,2,0\n1,2\n"))


def test_nan_and_missing_columns_are_errors(tmp_path):
    t = read_csv(_write(tmp_path / "a.csv", "a,y\n1,0\n2,1\n"))
    pre = Preprocessor.fit(t, target="y")
    with pytest.raises(DataError, match="missing/NaN"):
        pre.transform(Table.from_rows(["a"], [["1"], ["nan"]]))
    with pytest.raises(DataError, match="lacks columns the model needs: a"):
        pre.transform(Table.from_rows(["b"], [["1"]]))
    with pytest.raises(DataError, match="must be numeric"):
        pre.transform(Table.from_rows(["a"], [["x"]]))


def test_gzip_and_split(tmp_path):
    p = tmp_path / "b.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write('"x";"y"\n' + "".join(f"{i};{'yes' if i % 4 == 0 else 'no'}\n" for i in range(40)))
    t = read_csv(p, sep=";")
    y = Preprocessor.fit(t, target="y").labels(t)
    tr, te = stratified_split(y, 0.2, seed=0)
    assert len(te) == 8 and y[te].sum() == 2 and set(tr).isdisjoint(te)


@pytest.mark.skipif(not (SHARED / "bank_marketing").is_dir(), reason="shared data not present")
def test_shipped_tabular_sets_load():
    bank = load_bank(SHARED / "bank_marketing" / "bank-full.csv.gz")
    assert len(bank) == 45211 and "duration" not in bank.names
    pre = Preprocessor.fit(bank, target="y")
    assert pre.positive == "yes" and pre.labels(bank).sum() == 5289
    german = load_german(SHARED / "german_credit" / "german.data")
    assert len(german) == 1000 and Preprocessor.fit(german, "class").labels(german).sum() == 300
    taiwan = load_taiwan(SHARED / "default_credit_card_taiwan" / "UCI_Credit_Card.csv")
    assert Preprocessor.fit(taiwan, "Y").labels(taiwan).sum() == 6636
