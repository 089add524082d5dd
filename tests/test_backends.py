"""The vectorized backend trains exactly what the sequential backend trains.

Equivalence is proven in float64 (``TorchModel.astype(torch.float64)``): the two paths compute
the same arithmetic in a different order (batched matrix products, vmap), so in float64 they differ
by summation-order rounding only, ~1e-16 relative per operation; after the few hundred SGD steps
of these tests that stays far below ``ATOL`` = 1e-9, on any CPU. In float32, oneDNN/MKL choose
different kernels on AVX2 and AVX-512 machines, so a float32 bound would test the CPU, not hefl.
One float32 test remains (``test_float32_paths_differ_by_float32_rounding_only``), with its bound
derived from float32 rounding on the machine that runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hefl.algorithms import fedavg, fedprox
from hefl.backends import SequentialRunner, make_runner
from hefl.backends.vectorized import VectorizedRunner, cannot_vectorize, vectorized_runner
from hefl.client import FitConfig
from hefl.data.federated import ClientData, FederatedData
from hefl.errors import ConfigError
from hefl.models import LogisticRegressionModel, TorchModel
from hefl.models.zoo import CharLSTM
from hefl.simulation import run, simulate
from hefl.workloads import w1

# float64 training, sequential vs batched kernels: summation-order rounding only (see above).
ATOL = 1e-9
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``one_torch_thread`` in conftest.py)."""


def _both(model, data, algo, rounds, per_round, **options):
    """Sequential and vectorized runs of ``model`` in float64."""
    model = model.astype(F64)
    out = {}
    for backend in ("sequential", "vectorized"):
        runner = make_runner(model, data, backend, **options)
        out[backend] = run(
            runner, model.init_vector(), algo, rounds=rounds, clients_per_round=per_round
        )
    assert isinstance(make_runner(model, data, "vectorized", **options), VectorizedRunner)
    return out["sequential"], out["vectorized"], model


def _uneven(seed: int = 1, sizes=(0, 1, 5, 13, 40, 7)) -> FederatedData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(sum(sizes), 6)).astype(np.float32)
    y = rng.integers(0, 3, size=sum(sizes))
    parts, start = [], 0
    for n in sizes:
        parts.append(range(start, start + n))
        start += n
    return FederatedData.from_indices(x, y, parts)


def _small_mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_w1_config_a_same_model_as_sequential():
    w = w1("a")
    algo = fedavg(client_lr=w.client_lr, batch_size=w.batch_size)
    seq, vec, model = _both(w.model, w.data, algo, rounds=4, per_round=w.clients_per_round)
    assert np.abs(seq.params - vec.params).max() < ATOL
    for a, b in zip(seq.history.records, vec.history.records, strict=True):
        assert a.contributors == b.contributors
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-12)
    # and it really trained: the model moved and is good on the test set
    assert np.abs(vec.params - model.init_vector()).max() > 1e-2
    assert model.evaluate(vec.params, w.test)["accuracy"] > 0.5


def test_float32_paths_differ_by_float32_rounding_only():
    """The one float32 check: W1 config a, the dtype hefl trains in by default.

    Bound, derived on the machine that runs it: the float32 sequential run's own distance from
    the float64 run of the same training (float32 rounding, 2^-24 relative per operation, as this
    CPU's kernels round and these SGD steps amplify it), times 4. The vectorized path rounds in a
    different order, so its distance from the float64 trajectory is of that size too, and two
    such errors differ by at most their sum (factor 2; 4 leaves room for the max over 9,610
    parameters of two independent roundings). A real difference (a wrong batch, a missed or
    repeated step) moves parameters by lr * grad, orders of magnitude above."""
    w = w1("a")
    algo = fedavg(client_lr=w.client_lr, batch_size=w.batch_size)
    runs = {}
    for name, model, backend in [
        ("seq32", w.model, "sequential"),
        ("vec32", w.model, "vectorized"),
        ("seq64", w.model.astype(F64), "sequential"),
    ]:
        runner = make_runner(model, w.data, backend)
        runs[name] = run(runner, model.init_vector(), algo, rounds=2, clients_per_round=10)
    rounding = np.abs(runs["seq32"].params - runs["seq64"].params).max()
    assert 0 < rounding < 1e-4  # float32 really rounded, and only rounded
    bound = 4 * rounding
    assert np.abs(runs["vec32"].params - runs["seq32"].params).max() <= bound
    res = VectorizedRunner(w.model, w.data).fit(
        [0], w.model.init_vector(), {0: FitConfig(round=1, lr=0.05, epochs=1, batch_size=32)}
    )
    assert res[0].params.dtype == np.float32  # the trained values as they are, no float64 copy


def test_w1_config_c_sampled_cohorts_same_model():
    w = w1("c")
    algo = fedavg(client_lr=w.client_lr, batch_size=w.batch_size)
    seq, vec, _ = _both(w.model, w.data, algo, rounds=3, per_round=w.clients_per_round)
    assert np.abs(seq.params - vec.params).max() < ATOL


def test_fedprox_uneven_clients_several_epochs_same_model():
    """Clients with 1..40 examples (1..14 local steps, last batches partial), 3 epochs: finished
    clients must not move while others still train, even though the proximal term has a
    gradient without data."""
    model = TorchModel(_small_mlp, seed=3)
    algo = fedprox(mu=0.5, client_lr=0.1, epochs=3, batch_size=4)
    seq, vec, _ = _both(model, _uneven(), algo, rounds=3, per_round=6)
    assert np.abs(seq.params - vec.params).max() < ATOL
    assert seq.history.records[0].train_loss == pytest.approx(
        vec.history.records[0].train_loss, rel=1e-12
    )


def test_each_client_result_matches_and_empty_client_reports_zero():
    model = TorchModel(_small_mlp, seed=4, dtype=F64)
    data = _uneven(seed=2)
    cfgs = {
        cid: FitConfig(round=1, lr=0.2, epochs=2, batch_size=3, prox_mu=0.1, seed=10 + i)
        for i, cid in enumerate(data.ids)
    }
    g = model.init_vector() + 0.01
    seq = make_runner(model, data, "sequential").fit(data.ids, g, cfgs)
    vec = VectorizedRunner(model, data, max_cohort=2).fit(data.ids, g, cfgs)  # chunks of 2
    assert list(vec) == list(data.ids)
    assert vec[0].num_examples == 0 and np.array_equal(vec[0].params, g)
    for cid in data.ids[1:]:
        assert vec[cid].num_examples == seq[cid].num_examples == len(data[cid])
        assert np.abs(vec[cid].params - seq[cid].params).max() < ATOL
        assert vec[cid].metrics["loss"] == pytest.approx(seq[cid].metrics["loss"], rel=1e-12)


class _NextToken(torch.nn.Module):
    """A small next-token model with 3-D logits (batch, seq, vocab), vmap-friendly."""

    def __init__(self, vocab: int = 12) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 5)
        self.head = torch.nn.Linear(5, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def _tokens() -> FederatedData:
    rng = np.random.default_rng(0)
    x = rng.integers(1, 12, size=(23, 7))
    y = rng.integers(1, 12, size=(23, 7))
    y[:, 5:] = 0  # padding at the end of every sequence
    y[3] = 0  # one sequence with no real token, in a batch with real ones
    return FederatedData.from_indices(x, y, [range(0, 9), range(9, 23)])


def test_sequence_model_with_padding_tokens_ignored():
    """3-D logits with ignore_index=0: padded tokens and padded rows both contribute nothing,
    the mean is over the batch's real tokens, like TorchModel."""
    model = TorchModel(_NextToken, seed=0, ignore_index=0)
    algo = fedavg(client_lr=0.5, batch_size=4)
    seq, vec, _ = _both(model, _tokens(), algo, rounds=2, per_round=2)
    assert np.abs(seq.params - vec.params).max() < ATOL
    # a batch whose tokens are all padding has loss 0 on both paths (not NaN: 0/0), so no
    # client's reported loss is refused
    for a, b in zip(seq.history.records, vec.history.records, strict=True):
        assert a.rejected == b.rejected == {}
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-12)


def test_lstm_falls_back_because_vmap_would_loop(monkeypatch):
    lstm = TorchModel(lambda: CharLSTM(12, embed=4, hidden=8, layers=1), ignore_index=0)
    with pytest.warns(RuntimeWarning, match="no vmap batching rule"):
        assert isinstance(make_runner(lstm, _tokens(), "vectorized"), SequentialRunner)
    # the probe step finds ops vmap cannot batch even when the static check does not
    monkeypatch.setattr("hefl.backends.vectorized.cannot_vectorize", lambda m: None)
    with pytest.raises(ConfigError, match="cannot vectorize.*[Bb]atching rule"):
        VectorizedRunner(lstm, _tokens())


def test_unvectorizable_models_fall_back_with_a_warning():
    lin = LogisticRegressionModel(n_features=6, n_classes=3)
    with pytest.warns(RuntimeWarning, match="not a TorchModel"):
        runner = vectorized_runner(lin, _uneven())
    assert isinstance(runner, SequentialRunner)

    bn = TorchModel(lambda: torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4)))
    assert "buffers" in cannot_vectorize(bn)
    with pytest.warns(RuntimeWarning, match="buffers"):
        assert isinstance(make_runner(bn, _uneven(), "vectorized"), SequentialRunner)

    drop = TorchModel(lambda: torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.2)))
    with pytest.raises(ConfigError, match="dropout"):
        VectorizedRunner(drop, _uneven())


def test_unknown_or_missing_device_is_a_clear_error():
    model = TorchModel(_small_mlp)
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        make_runner(model, _uneven(), "vectorized", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            make_runner(model, _uneven(), "vectorized", device="cuda")
    with pytest.raises(ConfigError, match="max_cohort"):
        VectorizedRunner(model, _uneven(), max_cohort=0)


def test_auto_device_is_the_gpu_when_torch_sees_one(monkeypatch):
    from hefl.backends.vectorized import resolve_device

    model = TorchModel(_small_mlp)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert make_runner(model, _uneven(), "vectorized").device.type == expected  # the default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_client_id_is_reported_not_fatal():
    model = TorchModel(_small_mlp)
    data = _uneven()
    cfg = FitConfig(round=1, lr=0.1, epochs=1, batch_size=4)
    out = VectorizedRunner(model, data).fit([2, 99], model.init_vector(), {2: cfg, 99: cfg})
    assert out[2].num_examples == 5
    assert isinstance(out[99], Exception)


def test_client_eval_matches_sequential():
    model = TorchModel(_small_mlp)
    d = _uneven()
    data = FederatedData(d.train, {cid: ClientData(c.x[:2], c.y[:2]) for cid, c in d.train.items()})
    v = VectorizedRunner(model, data).evaluate(data.ids, model.init_vector())
    s = make_runner(model, data, "sequential").evaluate(data.ids, model.init_vector())
    assert {k: r.loss for k, r in v.items()} == {k: r.loss for k, r in s.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_same_model_as_sequential_cpu():
    model = TorchModel(_small_mlp, seed=3, dtype=F64)  # float64: CPU and GPU kernels differ
    algo = fedprox(mu=0.5, client_lr=0.1, epochs=2, batch_size=4)
    seq = run(
        make_runner(model, _uneven(), "sequential"),
        model.init_vector(),
        algo,
        rounds=2,
        clients_per_round=6,
    )
    runner = make_runner(model, _uneven(), "vectorized", device="cuda")
    vec = run(runner, model.init_vector(), algo, rounds=2, clients_per_round=6)
    assert np.abs(seq.params - vec.params).max() < ATOL


def test_simulate_with_vectorized_backend_equals_sequential():
    model = TorchModel(_small_mlp, seed=5, dtype=F64)
    algo = fedprox(mu=0.1, client_lr=0.1, batch_size=4)
    data = _uneven()
    test = (data[4].x, data[4].y)
    seq = simulate(model, data, algo, rounds=2, clients_per_round=3, test=test)
    vec = simulate(
        model, data, algo, rounds=2, clients_per_round=3, test=test, backend="vectorized"
    )
    assert np.abs(seq.params - vec.params).max() < ATOL
    assert vec.history.records[-1].metrics["test_accuracy"] == pytest.approx(
        seq.history.records[-1].metrics["test_accuracy"]
    )


def test_mlp_layers_recognises_plain_linear_stacks_only():
    from hefl.backends.vectorized import _mlp_layers

    assert [p for p, _ in _mlp_layers(w1("a").model.module)] == ["0", None, "2"]
    assert _mlp_layers(_small_mlp()) is not None
    assert _mlp_layers(_NextToken()) is None  # embedding: vmap path
    assert _mlp_layers(torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Softmax(-1))) is None

    class Shifted(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x + 1)

    assert _mlp_layers(Shifted(torch.nn.Linear(6, 3))) is None
    hooked = _small_mlp()
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    assert _mlp_layers(hooked) is None
    tied = torch.nn.Linear(6, 6)
    assert _mlp_layers(torch.nn.Sequential(tied, torch.nn.ReLU(), tied)) is None
    act = torch.nn.ReLU()  # one activation module used twice: both uses are layers
    shared = torch.nn.Sequential(torch.nn.Linear(6, 6), act, torch.nn.Linear(6, 6), act)
    assert [p for p, _ in _mlp_layers(shared)] == ["0", None, "2", None]


def _mlp_with_a_bias_free_layer():
    act = torch.nn.LeakyReLU(0.1)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), act, torch.nn.Linear(8, 8, bias=False), act, torch.nn.Linear(8, 3)
    )


def test_mlp_batched_matmuls_equal_the_vmap_path_and_sequential():
    """FedProx, uneven clients, several epochs, partial batches: the MLP path (batched matrix
    products) and the generic vmap path train the same clients to the same parameters."""
    model = TorchModel(_mlp_with_a_bias_free_layer, seed=6, dtype=F64)
    data = _uneven(seed=3)
    cfgs = {
        cid: FitConfig(round=2, lr=0.2, epochs=3, batch_size=4, prox_mu=0.3, seed=20 + i)
        for i, cid in enumerate(data.ids)
    }
    g = model.init_vector() - 0.02
    mlp = VectorizedRunner(model, data)
    generic = VectorizedRunner(model, data)
    generic._mlp = None  # force vmap over functional_call
    assert mlp._mlp is not None
    a, b = mlp.fit(data.ids, g, cfgs), generic.fit(data.ids, g, cfgs)
    seq = make_runner(model, data, "sequential").fit(data.ids, g, cfgs)
    for cid in data.ids[1:]:
        assert a[cid].params.dtype == np.float64  # the model's dtype, as trained
        assert np.abs(a[cid].params - b[cid].params).max() < ATOL
        assert np.abs(a[cid].params - seq[cid].params).max() < ATOL
        assert a[cid].metrics["loss"] == pytest.approx(b[cid].metrics["loss"], rel=1e-12)
        assert np.abs(a[cid].params - g).max() > 1e-3  # and they trained
