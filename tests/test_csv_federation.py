"""Your own table as a federation (issue 15): separator sniffing, blanks in text columns
reported, preprocessing fitted from the parties' summed statistics, ``hefl simulate --csv`` ->
model file -> encrypted scoring with the same accuracy, ``split-data --csv`` -> a deployment
whose clients read CSVs -> ``export-model``."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hefl.aggregation import PlainAggregator
from hefl.algorithms import fedavg
from hefl.analytics import fit_preprocessing
from hefl.cli import app
from hefl.data.federated import FederatedData
from hefl.data.parties import party_name, split_parties, split_table
from hefl.data.tabular import Preprocessor, Table, read_csv, sniff_sep
from hefl.errors import ConfigError, DataError
from hefl.inference.mlp import from_torch, poly_mlp_classifier
from hefl.inference.model import ModelFile
from hefl.models.linear import LogisticRegressionModel
from hefl.simulation import simulate

REGIONS = ("north", "south", "east", "west")


def churn_csv(path, n=600, sep=";", seed=0, blank_plan_row=None):
    """A telecom churn table hefl has never seen: text and numeric columns, ';'-separated."""
    rng = np.random.default_rng(seed)
    lines = [sep.join(['"region"', "plan", "tenure_months", "monthly_eur", "support_calls",
                       "churned"])]
    for i in range(n):
        region = REGIONS[rng.integers(4)]
        plan = ("basic", "plus", "pro")[rng.integers(3)]
        tenure, eur, calls = rng.integers(1, 72), rng.normal(40, 12), rng.poisson(2)
        z = -0.06 * (tenure - 30) + 0.05 * (eur - 40) + 0.6 * (calls - 2) + (plan == "basic")
        churned = "yes" if z + rng.logistic() > 0 else "no"
        plan = "" if i == blank_plan_row else plan
        lines.append(sep.join([region, plan, str(tenure), f"{eur:.2f}", str(calls), churned]))
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------ reading a table


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_separator_is_sniffed_and_remembered_by_the_model_file(tmp_path, sep):
    p = churn_csv(tmp_path / "c.csv", n=40, sep=sep)
    assert sniff_sep(p) == sep
    t = read_csv(p)
    assert t.sep == sep and t.names[0] == "region" and len(t) == 40
    pre = Preprocessor.fit(t, "churned")
    again = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again.sep == sep and again == pre


def test_space_separated_and_one_column_files(tmp_path):
    p = tmp_path / "german.data"
    p.write_text("A11  6 A34 1\nA12 48  A32 2\n")
    assert sniff_sep(p) == " "
    one = tmp_path / "one.csv"
    one.write_text("y\nyes\nno\n")
    assert sniff_sep(one) == ","


@pytest.mark.parametrize("blank", ["", "NA", "n/a", "?"])
def test_blank_in_a_text_column_is_reported_not_one_hot_encoded(tmp_path, blank):
    p = churn_csv(tmp_path / "c.csv", n=50, blank_plan_row=7)
    if blank:
        p.write_text(p.read_text().replace(";;", f";{blank};", 1))
    t = read_csv(p)
    with pytest.raises(DataError, match=r"text column 'plan' has 1 missing.*rows \[7\].*--drop "
                                        r"plan"):
        Preprocessor.fit(t, "churned")
    with pytest.raises(DataError, match="text column 'plan'.*rows \\[7\\]"):
        split_table(t, "churned", by="region")
    # dropping the column is the way out the message names
    kept = split_table(t.drop("plan"), "churned", by="region").preprocessing.columns
    assert [c.name for c in kept] == ["region", "tenure_months", "monthly_eur", "support_calls"]
    with pytest.raises(DataError, match="cannot drop 'plam'"):
        t.drop("plam")


def test_from_frame_with_pandas_reports_missing_values_and_splits_by_column():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"age": [20, 30, 40, 50, 60, 35], "job": ["a", "b", "a", "b", "c", None],
                       "y": ["no", "yes", "no", "yes", "yes", "no"]})
    with pytest.raises(DataError, match="text column 'job' has 1 missing.*rows \\[5\\]"):
        FederatedData.from_frame(df, "y", by="job")
    df.loc[5, "job"] = "c"
    fd = FederatedData.from_frame(df, target="y", by="job")
    assert fd.ids == ("a", "b", "c") and fd.sizes == (2, 2, 2)
    pre = fd.preprocessing
    assert pre.feature_names == ("age", "job=a", "job=b", "job=c")
    pooled = Preprocessor.fit(Table.from_frame(df), "y")
    np.testing.assert_allclose(pre.columns[0].mean, pooled.columns[0].mean, rtol=1e-12)
    np.testing.assert_allclose(pre.columns[0].std, pooled.columns[0].std, rtol=1e-12)
    # party "c" holds rows 4 and 5 of the frame, encoded like the pooled fit encodes them
    np.testing.assert_allclose(fd["c"].x, pooled.transform(Table.from_frame(df).take(
        np.array([4, 5]))), rtol=1e-12)
    np.testing.assert_array_equal(fd["c"].y, [1, 0])
    iid = FederatedData.from_frame(df, "y", clients=3, partition="iid")
    assert len(iid) == 3 and sum(iid.sizes) == 6


def test_party_names_are_token_safe_and_unique():
    taken: set[str] = set()
    assert [party_name(v, taken) for v in ("admin.", "blue collar", "admin", "", "é")] == [
        "admin", "blue-collar", "admin-2", "party", "party-2"]


# ------------------------------------------------- preprocessing without pooling the rows


def test_federated_preprocessing_equals_the_pooled_fit(tmp_path):
    t = read_csv(churn_csv(tmp_path / "c.csv", n=500))
    parties = split_parties(t, by="region")
    pre = fit_preprocessing(parties, "churned")
    pooled = Preprocessor.fit(t, "churned")
    assert pre.feature_names == pooled.feature_names and pre.positive == "yes"
    assert pre.sep == ";"
    for a, b in zip(pre.columns, pooled.columns, strict=True):
        assert (a.kind, a.categories) == (b.kind, b.categories)
        # means of per-party means weighted by row counts: float64 rounding only
        np.testing.assert_allclose([a.mean, a.std], [b.mean, b.std], rtol=1e-9)


def test_federated_preprocessing_under_ckks_matches_within_its_error(tmp_path):
    from hefl.inference.pipeline import encrypted_aggregator

    t = read_csv(churn_csv(tmp_path / "c.csv", n=300))
    parties = split_parties(t, by="region")
    enc = fit_preprocessing(parties, "churned", make_aggregator=encrypted_aggregator())
    plain = fit_preprocessing(parties, "churned", make_aggregator=PlainAggregator)
    for a, b in zip(enc.columns, plain.columns, strict=True):
        assert a.categories == b.categories
        # CKKS sums of values in [-1, 1] err by ~1e-7 of the total weight; moments are scaled
        # by the column's power-of-ten bound (100 here), so 1e-4 relative is a wide margin
        np.testing.assert_allclose([a.mean, a.std], [b.mean, b.std], rtol=1e-4)


def test_parties_with_different_columns_are_refused(tmp_path):
    t = read_csv(churn_csv(tmp_path / "c.csv", n=40))
    with pytest.raises(DataError, match="every party needs the same columns"):
        fit_preprocessing({"a": t, "b": t.drop("plan")}, "churned")


# ------------------------------------------------------------ models that score encrypted


def test_two_output_poly_mlp_exports_as_the_one_logit_model():
    torch.manual_seed(0)
    m = poly_mlp_classifier(5, 7).double()
    x = np.random.default_rng(0).normal(size=(20, 5))
    z = m(torch.as_tensor(x)).detach().numpy()
    np.testing.assert_allclose(from_torch(m).logits(x), z[:, 1] - z[:, 0], rtol=0, atol=1e-12)


# -------------------------------------------------------------- hefl simulate --csv, end to end


def _serve(model_path, fed, tmp_path):
    from hefl.inference.callers import Budget, Quotas
    from hefl.inference.server import make_server
    from hefl.inference.service import ScoringService

    service = ScoringService(ModelFile.load(model_path))
    server = make_server(service, fed.server_cert, fed.server_key, fed.registry, port=0,
                         quotas=Quotas(Budget(), ledger=tmp_path / "usage.jsonl"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_simulate_csv_then_encrypted_scoring_gives_the_same_accuracy(tmp_path, model):
    from hefl.inference.service import ScoringClient, score_csv
    from hefl.net.certs import make_federation

    data = churn_csv(tmp_path / "churn.csv", n=1500)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["simulate", "--csv", str(data), "--target", "churned",
                                 "--partition-by", "region", "--model", model, "--rounds", "10",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["clients"] == 4 and s["clients_per_round"] == 4  # cross-silo: every party
    assert sorted(s["parties"]) == sorted(REGIONS) and sum(s["parties"].values()) == 1200
    assert s["test_rows"] == 300
    assert s["final_accuracy"] > 0.7  # well above the majority class on this data
    mf = ModelFile.load(out / "model.json")
    assert mf.preprocessing is not None and mf.preprocessing.sep == ";"
    test = read_csv(out / "test.csv")
    assert len(test) == 300 and test.sep == ";"
    x, y = mf.preprocessing.transform(test), mf.preprocessing.labels(test)
    plain = mf.model.logits(x)
    assert ((plain > 0) == y).mean() == pytest.approx(s["final_accuracy"], abs=1e-12)

    fed = make_federation(tmp_path / "certs", ["bank"])
    server = _serve(out / "model.json", fed, tmp_path)
    try:
        client = ScoringClient(f"https://127.0.0.1:{server.server_address[1]}", fed.ca,
                               token_file=fed.token("bank"))
        got = score_csv(client, out / "test.csv", tmp_path / "scores.csv",
                        preprocessing=mf.preprocessing)
    finally:
        server.shutdown()
        server.server_close()
    scores = read_csv(tmp_path / "scores.csv")
    enc = scores["logit"].astype(float)
    # CKKS (precise profile) errs by well under 1e-3 on these logits; a record that close to
    # the boundary could flip, none may otherwise
    close = np.abs(plain) < 1e-3
    assert np.array_equal((enc > 0)[~close], (plain > 0)[~close])
    np.testing.assert_allclose(enc, plain, atol=1e-3)
    assert got.accuracy == pytest.approx(((enc > 0) == y).mean())
    assert got.accuracy == pytest.approx(s["final_accuracy"], abs=close.sum() / len(y) + 1e-12)


def test_simulate_csv_bad_input_is_explained(tmp_path):
    data = churn_csv(tmp_path / "churn.csv", n=100)
    run = CliRunner().invoke
    cases = [
        (["--csv", str(data)], "--csv needs --target"),
        (["--csv", str(data), "--target", "churn"], "target column 'churn' is not in the data"),
        (["--csv", str(data), "--target", "churned", "--model", "cnn"], "logreg or mlp"),
        (["--csv", str(data), "--target", "churned", "--partition-by", "region",
          "--clients", "3"], "not both"),
        (["--csv", str(data), "--target", "churned", "--partition-by", "region", "-k", "9"],
         "at most 4"),
        (["--target", "churned"], "go with --csv"),
        (["--save-model", str(tmp_path / "m.json")], "needs a --csv federation"),
    ]
    for args, message in cases:
        r = run(app, ["simulate", "--rounds", "1", *args])
        assert r.exit_code == 2, (args, r.output)
        assert message in " ".join(r.output.split()), (args, r.output)


# --------------------------------------------- split-data --csv -> deployment -> export-model


@pytest.mark.timeout(180)
def test_split_data_csv_deployment_trains_like_simulation_and_exports(tmp_path):
    from hefl.net.testing import make_demo, run_in_threads

    data = churn_csv(tmp_path / "churn.csv", n=400)
    parts = tmp_path / "parties"
    r = CliRunner().invoke(app, ["split-data", "--csv", str(data), "--target", "churned",
                                 "--by", "region", "--out", str(parts)])
    assert r.exit_code == 0, r.output
    pre = Preprocessor.load(parts / "preprocessing.json")
    names = sorted(REGIONS)
    assert sorted(p.stem for p in parts.glob("*.csv")) == sorted([*names, "test"])
    assert f"n_features = {pre.n_features}" in r.output

    # the deployment: certs and run.toml from the test helper; each client reads its CSV
    spec = {"kind": "logreg", "n_features": pre.n_features, "n_classes": 2}
    placeholder = FederatedData.from_indices(np.zeros((4, pre.n_features)), np.zeros(4),
                                             [[0], [1], [2], [3]])
    demo = make_demo(tmp_path / "fed", placeholder, model=spec, rounds=3, clients_per_round=4,
                     names=names, algorithm={"name": "fedavg", "client_lr": 0.2},
                     server={"min_clients": 4, "test_data": str(parts / "test.csv"),
                             "preprocessing": str(parts / "preprocessing.json")})
    opts = {n: {"data": parts / f"{n}.csv", "preprocessing": parts / "preprocessing.json"}
            for n in names}
    records, params, _ = run_in_threads(demo, opts)
    assert [r.contributors for r in records] == [4, 4, 4]
    assert "test_accuracy" in records[-1].metrics  # the server scored test.csv every round

    parties = {n: read_csv(parts / f"{n}.csv") for n in names}
    fd = FederatedData({n: FederatedData.from_frame(t, "churned", preprocessing=pre,
                                                    clients=1).train["client-0"]
                        for n, t in parties.items()})
    ref = simulate(LogisticRegressionModel(pre.n_features), fd, fedavg(client_lr=0.2),
                   rounds=3, clients_per_round=4)
    np.testing.assert_allclose(params, ref.params, rtol=0, atol=1e-9)

    out = tmp_path / "model.json"
    r = CliRunner().invoke(app, ["export-model", "--state", str(demo.state), "--preprocessing",
                                 str(parts / "preprocessing.json"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    mf = ModelFile.load(out)
    test = read_csv(parts / "test.csv")
    lin = LogisticRegressionModel(pre.n_features)
    np.testing.assert_allclose(mf.model.logits(pre.transform(test)),
                               lin.decision_function(params, pre.transform(test)), atol=1e-12)
    assert mf.preprocessing == pre


def test_client_csv_without_preprocessing_fails_at_once(tmp_path):
    from hefl.net.data import load_client_data

    data = churn_csv(tmp_path / "churn.csv", n=30)
    with pytest.raises(ConfigError, match="also pass --preprocessing"):
        load_client_data(data)
    pre = Preprocessor.fit(read_csv(data), "churned")
    other = churn_csv(tmp_path / "other.csv", n=30, seed=1)
    other.write_text(other.read_text().replace("north", "arctic"))
    with pytest.raises(DataError, match="categories the federation's preprocessing does not"):
        load_client_data(other, pre)


def test_constant_and_low_spread_columns_keep_their_spread():
    """E[x^2] - E[x]^2 cancels for timestamps and constants; the centred round does not. A
    constant column gets std 1 (under CKKS too), never a rounding residue that would blow up a
    scored record's logit."""
    from hefl.inference.pipeline import encrypted_aggregator

    rng = np.random.default_rng(0)
    n = 400
    cols = {"const": ["2"] * n, "c07": ["0.7"] * n,
            "ts": [f"{1.7e9 + rng.normal(0, 100):.3f}" for _ in range(n)],
            "inc": [f"{50000 + rng.normal(0, 2):.4f}" for _ in range(n)],
            "y": [("yes", "no")[i % 2] for i in range(n)]}
    t = Table({k: np.array(v) for k, v in cols.items()})
    parties = split_parties(t, clients=3, partition="iid")
    pooled = Preprocessor.fit(t, "y")
    plain = fit_preprocessing(parties, "y")
    enc = fit_preprocessing(parties, "y", make_aggregator=encrypted_aggregator())
    for a, b, e in zip(plain.columns, pooled.columns, enc.columns, strict=True):
        np.testing.assert_allclose([a.mean, a.std], [b.mean, b.std], rtol=1e-9)
        if b.name in ("const", "c07"):
            assert a.std == e.std == 1.0
    # CKKS: the spread is right to the mean's error (~1e-7 of the column's 1e10 bound for ts)
    np.testing.assert_allclose(enc.columns[3].std, pooled.columns[3].std, rtol=1e-3)


def test_review_findings_inputs_are_handled(tmp_path):
    """Real levels named 'none', a tab given as '\\t', a too-small split, pandas' nullable
    missing values, a party file with another separator, labels blank in new records."""
    from hefl.inference.service import _accuracy
    from hefl.net.data import load_client_data

    p = churn_csv(tmp_path / "c.csv", n=60)
    p.write_text(p.read_text().replace("basic", "none"))
    assert "plan=none" in Preprocessor.fit(read_csv(p), "churned").feature_names
    tsv = churn_csv(tmp_path / "c.tsv", n=20, sep="\t")
    assert read_csv(tsv, sep="\\t").sep == "\t" and read_csv(tsv, sep="tab").sep == "\t"
    with pytest.raises(DataError, match="one character"):
        read_csv(tsv, sep="::")
    tiny = Table.from_rows(["x", "y"], [["1", "yes"], ["2", "no"], ["3", "no"]])
    with pytest.raises(DataError, match="--test-size 0"):
        split_table(tiny, "y", clients=1)
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"age": pd.array([20, None, 40], dtype="Int64"),
                       "job": pd.array(["a", None, "b"], dtype="string"), "y": ["no", "yes", "no"]})
    with pytest.raises(DataError, match="text column 'job' has 1 missing"):
        FederatedData.from_frame(df, "y", clients=1)
    with pytest.raises(DataError, match="column 'age' has 1 missing"):
        FederatedData.from_frame(df.drop(columns="job"), "y", clients=1)
    # the party's file uses ',' where the federation's training file used ';'
    pre = Preprocessor.fit(read_csv(p), "churned")
    comma = tmp_path / "party.csv"
    read_csv(p).write_csv(comma, sep=",")
    np.testing.assert_array_equal(load_client_data(comma, pre).x, pre.transform(read_csv(p)))
    # accuracy only over labelled rows
    out = tmp_path / "scores.csv"
    out.write_text("row,logit,probability\n0,1.0,0.7\n1,-1.0,0.3\n2,2.0,0.9\n")
    rows = lambda labels: Table.from_rows(["churned"], [[v] for v in labels])  # noqa: E731
    assert _accuracy(out, rows(["", "", ""]), pre) is None
    assert _accuracy(out, rows(["yes", "", "no"]), pre) == 0.5
    assert _accuracy(out, rows(["yes", "no", "yes"]), pre) == 1.0
