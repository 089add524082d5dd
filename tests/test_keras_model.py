"""KerasModel: a Keras 3 model (PyTorch backend) trains exactly as the equivalent torch module.

Equivalences are proven in float64, as in tests/test_backends.py: the Keras and torch forward
passes (and the sequential and vectorized backends) run the same arithmetic in a different order
(``x @ kernel + bias`` against ``addmm``, batched kernels under vmap), so they differ by summation
order rounding only, ~1e-16 relative per operation; after the few dozen SGD steps here that stays
orders of magnitude below ``ATOL`` = 1e-9. Each test also checks that training moved the weights
by far more than ``ATOL``, so a silently skipped update cannot pass.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from hefl.algorithms import fedavg, fedprox  # noqa: E402
from hefl.backends import SequentialRunner, make_runner  # noqa: E402
from hefl.backends.vectorized import VectorizedRunner  # noqa: E402
from hefl.client import FitConfig  # noqa: E402
from hefl.data.federated import ClientData, FederatedData  # noqa: E402
from hefl.data.tabular import shared_data  # noqa: E402
from hefl.errors import ConfigError  # noqa: E402
from hefl.models import KerasModel, TorchModel  # noqa: E402
from hefl.models.keras import load_keras, torch_layout  # noqa: E402
from hefl.net.config import build_model, load_config  # noqa: E402
from hefl.simulation import simulate  # noqa: E402

ATOL = 1e-9  # float64, two orders of summation: rounding only (module docstring)
# Keras 3.15's Variable.__array__ takes no ``copy`` keyword, which NumPy 2 warns about on every
# get_weights()/save(): Keras's own warning, not hefl's
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
F64 = torch.float64
L = keras.layers
CF = "channels_first"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``one_torch_thread`` in conftest.py)."""


def small_cnn(classes: int = 5, softmax: bool = False):
    """conv5x5(4)-pool-conv3x3(6)-pool-dense(12)-dense(classes), channels first, on 1x12x12."""
    return keras.Sequential([
        keras.Input((1, 12, 12)),
        L.Conv2D(4, 5, padding="same", activation="relu", data_format=CF, name="c1"),
        L.MaxPooling2D(2, data_format=CF),
        L.Conv2D(6, 3, padding="same", activation="relu", data_format=CF, name="c2"),
        L.MaxPooling2D(2, data_format=CF),
        L.Flatten(),
        L.Dense(12, activation="tanh", name="d1"),
        L.Dense(classes, activation="softmax" if softmax else None, name="out"),
    ])


def torch_twin(classes: int = 5) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6 * 3 * 3, 12), torch.nn.Tanh(),
        torch.nn.Linear(12, classes),
    )


def images(n: int, seed: int = 0, classes: int = 5) -> ClientData:
    rng = np.random.default_rng(seed)
    return ClientData(rng.random((n, 1, 12, 12)).astype(np.float32),
                      rng.integers(0, classes, n).astype(np.int64))


def federated(sizes=(1, 9, 23, 4, 17, 30), seed: int = 3) -> FederatedData:
    d = images(sum(sizes), seed)
    parts, start = [], 0
    for n in sizes:
        parts.append(range(start, start + n))
        start += n
    return FederatedData.from_indices(d.x, d.y, parts)


# ------------------------------------------------------------------------- flat vector, spec


def test_vector_is_get_weights_flattened_and_round_trips():
    m = KerasModel(small_cnn, seed=0)
    weights = m.keras_model.get_weights()
    assert m.spec.names == ("c1/kernel", "c1/bias", "c2/kernel", "c2/bias", "d1/kernel",
                            "d1/bias", "out/kernel", "out/bias")
    assert m.spec.shapes == tuple(w.shape for w in weights)
    assert np.array_equal(m.get_vector(), np.concatenate([w.ravel() for w in weights]))
    assert np.array_equal(m.init_vector(), m.get_vector())
    # set_vector writes into the Keras variables themselves: the Keras call sees the new values
    v = np.random.default_rng(1).normal(size=m.spec.size).astype(np.float32).astype(np.float64)
    m.set_vector(v)
    assert np.array_equal(m.get_vector(), v)
    for w, a in zip(m.keras_model.get_weights(), m.spec.unflatten(v).values(), strict=True):
        assert np.array_equal(w, a)
    v[0] += 1.0  # the adapter copied the vector: changing it afterwards changes nothing
    assert m.get_vector()[0] == v[0] - 1.0
    # a deep copy (what the vectorized backend trains) is a new Keras model with equal weights
    twin = copy.deepcopy(m.module)
    x = torch.tensor(images(2).x)
    assert twin.keras_model is not m.keras_model and torch.equal(twin(x), m.module(x))
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(twin(x), m.module(x)) and m.get_vector()[0] == v[0] - 1.0
    # the same seed, the same initial model; another seed, another
    assert np.array_equal(KerasModel(small_cnn, seed=0).init_vector(), m.init_vector())
    assert not np.array_equal(KerasModel(small_cnn, seed=1).init_vector(), m.init_vector())


def test_astype_float64_keeps_the_weights_and_the_initial_vector():
    m = KerasModel(small_cnn, seed=0)
    m.set_vector(m.init_vector() + 0.5)
    m64 = m.astype(F64)
    assert [w.dtype for w in m64.keras_model.weights] == ["float64"] * 8
    assert m64.spec.names == m.spec.names
    assert np.array_equal(m64.get_vector(), m.get_vector())
    assert np.array_equal(m64.init_vector(), m.init_vector())
    # built in float64 directly: initialised in float32, then converted, as by astype
    assert np.array_equal(KerasModel(small_cnn, seed=0, dtype=F64).init_vector(),
                          m.init_vector())
    # a model given as an object is rebuilt too (clone_model), with its weights
    given = small_cnn()
    m2 = KerasModel(given, dtype="float64")
    assert m2.dtype == F64 and m2.keras_model is not given
    assert np.array_equal(m2.init_vector(), KerasModel(given).init_vector())
    assert m2.astype(torch.float32).keras_model.weights[0].dtype == "float32"


def test_misuse_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="outputs='probabilities'"):
        KerasModel(lambda: small_cnn(softmax=True))
    with pytest.raises(ConfigError, match="has no weights yet"):
        KerasModel(keras.Sequential([L.Dense(2)]))
    with pytest.raises(ConfigError, match="kernel_regularizer"):
        KerasModel(lambda: keras.Sequential(
            [keras.Input((3,)), L.Dense(2, kernel_regularizer="l2")]))
    with pytest.raises(ConfigError, match="floating-point"):
        KerasModel(small_cnn, dtype=torch.int32)


def test_another_keras_backend_is_a_config_error():
    code = ("from hefl.models.keras import import_keras\n"
            "try:\n    import_keras()\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.startswith("ConfigError KERAS_BACKEND='jax'"), out.stdout + out.stderr
    assert "set KERAS_BACKEND=torch" in out.stdout


# -------------------------------------------------------------------- the same local update


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_same_local_update_as_the_equivalent_torch_module(mu):
    """SGD and FedProx, two epochs over 23 examples in batches of 5 (a partial last batch)."""
    km = KerasModel(small_cnn, seed=0, dtype=F64)
    tm = TorchModel(torch_twin, dtype=F64)
    start = km.init_vector()
    data = images(23, seed=2)
    cfg = FitConfig(round=1, lr=0.2, epochs=2, batch_size=5, prox_mu=mu, seed=7)
    k_new, k_metrics = km.fit(start, data, cfg)
    t_new, t_metrics = tm.fit(torch_layout(km, start), data, cfg)
    assert np.abs(torch_layout(km, k_new) - t_new).max() < ATOL
    assert k_metrics["loss"] == pytest.approx(t_metrics["loss"], abs=ATOL)
    assert np.abs(k_new - start).max() > 1e-3  # it trained
    k_eval, t_eval = km.evaluate(k_new, data), tm.evaluate(t_new, data)
    assert k_eval["loss"] == pytest.approx(t_eval["loss"], abs=ATOL)
    assert k_eval["accuracy"] == t_eval["accuracy"]


def test_a_softmax_model_trains_as_its_logits_twin():
    """outputs='probabilities': the cross-entropy of the probabilities (log of a softmax equals
    log_softmax up to rounding), so the update matches the logits model's."""
    logits = KerasModel(small_cnn, seed=0, dtype=F64)
    probs = KerasModel(lambda: small_cnn(softmax=True), seed=0, dtype=F64,
                       outputs="probabilities")
    start = logits.init_vector()
    data = images(12, seed=4)
    cfg = FitConfig(round=1, lr=0.3, epochs=1, batch_size=4, seed=1)
    a, _ = logits.fit(start, data, cfg)
    b, _ = probs.fit(start, data, cfg)
    assert np.abs(a - b).max() < ATOL and np.abs(a - start).max() > 1e-3


def test_batchnorm_statistics_are_in_the_vector_and_sgd_leaves_them_to_keras():
    def bn_model():
        return keras.Sequential([keras.Input((3,)), L.Dense(4, name="d"),
                                 L.BatchNormalization(name="bn"), L.Dense(2, name="o")])

    m = KerasModel(bn_model, dtype=F64)
    assert m.spec.names[2:6] == ("bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance")
    rng = np.random.default_rng(0)
    data = ClientData(rng.normal(3.0, 1.0, (8, 3)), rng.integers(0, 2, 8))
    start = m.init_vector()
    new, _ = m.fit(start, data, FitConfig(round=1, lr=0.0, epochs=1, batch_size=8))
    parts = m.spec.unflatten(new)
    # lr 0: SGD moved nothing trainable, yet the moving mean moved as Keras's momentum says
    for n in ("d/kernel", "bn/gamma", "o/kernel"):
        assert np.array_equal(parts[n], m.spec.unflatten(start)[n])
    h = data.x @ parts["d/kernel"] + parts["d/bias"]
    assert np.allclose(parts["bn/moving_mean"], 0.01 * h.mean(0), atol=1e-12)  # 0.99 * 0 + ...


# ------------------------------------------------------------ sequential and vectorized runs


def test_sequential_and_vectorized_backends_train_the_same_global_model():
    model = KerasModel(small_cnn, seed=0, dtype=F64)
    data = federated()
    assert isinstance(make_runner(model, data, "vectorized", device="cpu"), VectorizedRunner)
    out = {}
    for algo in (fedavg(client_lr=0.2, batch_size=4), fedprox(mu=0.5, client_lr=0.2,
                                                                batch_size=4)):
        for backend in ("sequential", "vectorized"):
            out[algo.name, backend] = simulate(
                model, data, algo, rounds=3, clients_per_round=4, seed=1, backend=backend,
                backend_options={"device": "cpu"} if backend == "vectorized" else None,
                progress=False,
            )
        seq, vec = out[algo.name, "sequential"], out[algo.name, "vectorized"]
        assert np.abs(seq.params - vec.params).max() < ATOL
        assert np.abs(seq.params - model.init_vector()).max() > 1e-2
        for a, b in zip(seq.history.records, vec.history.records, strict=True):
            assert a.train_loss == pytest.approx(b.train_loss, abs=ATOL)
    assert np.abs(out["fedavg", "vectorized"].params - out["fedprox", "vectorized"].params
                  ).max() > 1e-4  # FedProx's term did something


def test_femnist_writers_sequential_equals_vectorized():
    path = shared_data("femnist_leaf")
    if not path.exists():
        pytest.skip(f"FEMNIST not found at {path} (it lives in ../shared/data; set "
                    "HEFL_SHARED_DATA)")
    from hefl.data.loaders import load_femnist

    full = load_femnist(path)
    ids = list(full.ids)[:4]
    data = FederatedData({i: full.train[i] for i in ids}, {i: full.test[i] for i in ids})

    def cnn():
        return keras.Sequential([
            keras.Input((1, 28, 28)),
            L.Conv2D(4, 5, padding="same", activation="relu", data_format=CF),
            L.MaxPooling2D(4, data_format=CF), L.Flatten(), L.Dense(62),
        ])

    model = KerasModel(cnn, dtype=F64)
    runs = [simulate(model, data, fedavg(client_lr=0.06, batch_size=20), rounds=2,
                     clients_per_round=3, backend=b, progress=False,
                     backend_options={"device": "cpu"} if b == "vectorized" else None)
            for b in ("sequential", "vectorized")]
    assert np.abs(runs[0].params - runs[1].params).max() < ATOL
    assert np.abs(runs[0].params - model.init_vector()).max() > 1e-3


def _fallback_reason(model_fn, data=None) -> str:
    model = KerasModel(model_fn)
    data = data or FederatedData.from_indices(np.ones((4, 3), np.float32),
                                              np.array([0, 1, 0, 1]), [[0, 1], [2, 3]])
    with pytest.warns(RuntimeWarning, match="running clients sequentially") as caught:
        runner = make_runner(model, data, "vectorized", device="cpu")
    assert isinstance(runner, SequentialRunner)
    return str(caught[0].message)


def test_layers_that_cannot_be_vectorized_fall_back_naming_the_layer():
    bn = _fallback_reason(lambda: keras.Sequential(
        [keras.Input((3,)), L.Dense(4), L.BatchNormalization(name="norm"), L.Dense(2)]))
    assert "'norm/moving_mean' is not trainable" in bn
    frozen = keras.Sequential([keras.Input((3,)), L.Dense(4, name="base"), L.Dense(2)])
    frozen.layers[0].trainable = False
    assert "'base/kernel' is not trainable" in _fallback_reason(frozen)
    drop = _fallback_reason(lambda: keras.Sequential(
        [keras.Input((3,)), L.Dense(4), L.Dropout(0.5, name="drop"), L.Dense(2)]))
    assert "layer 'drop' (Dropout) draws random numbers" in drop
    # Dropout(0) draws nothing: it vectorizes
    none = KerasModel(lambda: keras.Sequential([keras.Input((3,)), L.Dense(4), L.Dropout(0.0),
                                                L.Dense(2)]))
    assert none.cannot_vectorize() is None
    last = _fallback_reason(lambda: keras.Sequential(
        [keras.Input((12, 12, 1)), L.Conv2D(2, 3, name="conv"), L.Flatten(), L.Dense(2)]),
        FederatedData.from_indices(np.ones((4, 12, 12, 1), np.float32), np.array([0, 1, 0, 1]),
                                   [[0, 1], [2, 3]]))
    assert "layer 'conv' (Conv2D) uses data_format='channels_last'" in last


def test_the_channels_last_reason_is_true():
    """If Keras's channels_last convolution ever runs under vmap, this fails: then lift the
    restriction in KerasModel.cannot_vectorize."""
    model = KerasModel(lambda: keras.Sequential(
        [keras.Input((6, 6, 1)), L.Conv2D(2, 3), L.Flatten(), L.Dense(2)]))
    params = {n: p.detach().unsqueeze(0) for n, p in model.module.named_parameters()}
    x = torch.ones(1, 2, 6, 6, 1)
    call = torch.func.vmap(lambda p, xb: torch.func.functional_call(model.module, p, (xb,)))
    with pytest.raises(RuntimeError, match="is_contiguous inside of vmap"):
        call(params, x)


# -------------------------------------------------------------------- files and deployment


def test_save_and_load_keras_file_round_trip(tmp_path):
    m = KerasModel(small_cnn, seed=0)
    trained = (m.init_vector() + np.linspace(-1, 1, m.spec.size)).astype(np.float32)
    f = m.save(tmp_path / "model.keras", trained)
    loaded = load_keras(f)
    assert loaded.spec == m.spec  # names without the model's own name: the same in any process
    assert np.array_equal(loaded.init_vector(), trained)
    x = torch.tensor(images(3).x)
    assert torch.equal(loaded.module.eval()(x), m.module.eval()(x))
    soft = KerasModel(lambda: small_cnn(softmax=True), outputs="probabilities")
    assert load_keras(soft.save(tmp_path / "soft.keras")).outputs == "probabilities"
    assert load_keras(f, dtype="float64").dtype == F64
    with pytest.raises(ConfigError, match="not found"):
        load_keras(tmp_path / "missing.keras")
    with pytest.raises(ConfigError, match="must end in .keras"):
        m.save(tmp_path / "model.h5")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot read Keras model file"):
        load_keras(tmp_path / "bad.keras")


def test_config_model_kind_keras(tmp_path):
    m = KerasModel(small_cnn, seed=3)
    m.save(tmp_path / "model.keras")
    (tmp_path / "run.toml").write_text(
        '[run]\nname = "k"\n[model]\nkind = "keras"\npath = "model.keras"\n'
        '[tls]\ninsecure = true\n[[clients.client]]\nname = "a"\ntoken_sha256 = "00"\n')
    cfg = load_config(tmp_path / "run.toml")
    built = build_model(cfg.model, base=tmp_path)
    assert isinstance(built, KerasModel)
    assert np.array_equal(built.init_vector(), m.init_vector())
    assert build_model({"kind": "keras", "path": str(tmp_path / "model.keras"),
                        "dtype": "float64"}).dtype == F64
    with pytest.raises(ConfigError, match=r"needs path = \"model.keras\""):
        build_model({"kind": "keras"})
    with pytest.raises(ConfigError, match="not found"):
        build_model({"kind": "keras", "path": "elsewhere.keras"}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown \[model\] option"):
        build_model({"kind": "keras", "path": "model.keras", "hidden": 3}, base=tmp_path)


def test_hefl_simulate_trains_a_keras_model_file_on_a_named_data_set(tmp_path):
    """``hefl simulate --dataset digits --model mlp.keras``: the file's model, not the data set's
    torch one, is trained; a model name meant for --csv is refused with --dataset."""
    import json

    from typer.testing import CliRunner

    from hefl.cli import app

    def digits_mlp():
        return keras.Sequential([keras.Input((64,)), L.Dense(16, activation="relu"), L.Dense(10)])

    f = KerasModel(digits_mlp, seed=0).save(tmp_path / "mlp.keras")
    r = CliRunner().invoke(app, ["simulate", "--model", str(f), "--rounds", "10", "--clients",
                                 "10", "-k", "5", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert s["params"] == 64 * 16 + 16 + 16 * 10 + 10  # the Keras MLP, not W1's 64-128-10
    assert s["final_accuracy"] > 0.5  # 10 classes, chance is 0.1: it learned
    r = CliRunner().invoke(app, ["simulate", "--model", "mlp", "--rounds", "1"])
    assert r.exit_code == 2 and "logreg and mlp go with --csv" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["simulate", "--csv", str(tmp_path / "x.csv"), "--target", "y",
                                 "--model", str(f), "--rounds", "1"])
    assert r.exit_code == 2
