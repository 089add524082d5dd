"""Named workloads: everything a run needs (model, federated data, test set, algorithm).

W1 reproduces ``../shared/bench/WORKLOADS.md`` exactly: digits split 80/20 (seed 0), scaled,
Dirichlet(0.5) label split, MLP 64-128-10 initialised after ``torch.manual_seed(0)``, SGD lr 0.05,
batch 32, one local epoch, FedAvg. W2 (``femnist``: LEAF FEMNIST by writer, LEAF CNN) and W3
(``shakespeare``: TFF Shakespeare by role, character LSTM) take the data's path; nothing downloads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hefl.data.federated import ClientData, FederatedData
from hefl.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    """A ready-to-run federated task.

    ``export`` (tabular workloads): trained parameters -> the model file ``hefl infer serve``
    loads (``hefl.inference.model.ModelFile``, preprocessing included); ``split``: the
    parties' raw rows and the held-out rows (``hefl.data.parties.TabularSplit``).
    """

    name: str
    model: Any
    data: FederatedData
    test: ClientData | None
    client_lr: float
    batch_size: int
    rounds: int
    clients_per_round: int
    export: Callable[[np.ndarray], Any] | None = None
    split: Any = None


W1_CONFIGS = {"a": (10, 10, 20), "b": (100, 10, 30), "c": (1000, 50, 10)}


def digits(
    num_clients: int = 100,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    rounds: int = 20,
    clients_per_round: int = 10,
    client_lr: float = 0.05,
    batch_size: int = 32,
) -> Workload:
    """scikit-learn digits with the W1 split, model and local training."""
    from hefl.data.loaders import load_digits
    from hefl.data.partition import dirichlet, iid
    from hefl.models.torch import TorchModel
    from hefl.models.zoo import mlp

    d = load_digits(seed)
    if partition == "dirichlet":
        parts = dirichlet(d.y_train, num_clients, alpha, seed)
    elif partition == "iid":
        parts = iid(len(d.y_train), num_clients, seed)
    else:
        raise ConfigError(f"unknown partition {partition!r}; choose 'dirichlet' or 'iid'")
    return Workload(
        name="digits",
        model=TorchModel(mlp, seed=seed),
        data=FederatedData.from_indices(d.x_train, d.y_train, parts),
        test=ClientData(d.x_test, d.y_test),
        client_lr=client_lr,
        batch_size=batch_size,
        rounds=rounds,
        clients_per_round=clients_per_round,
    )


def w1(config: str) -> Workload:
    """Workload W1 config ``a``, ``b`` or ``c``."""
    if config not in W1_CONFIGS:
        raise ConfigError(f"unknown W1 config {config!r}; choose one of a, b, c")
    n, k, r = W1_CONFIGS[config]
    return digits(num_clients=n, rounds=r, clients_per_round=k)


def _pooled_test(data: FederatedData, limit: int | None = None) -> ClientData | None:
    """All clients' own test splits, concatenated (accuracy on it = example-weighted mean of the
    per-client accuracies); the first ``limit`` examples only if given."""
    parts = [d for d in data.test.values() if len(d)]
    if not parts:
        return None
    x, y = np.concatenate([d.x for d in parts]), np.concatenate([d.y for d in parts])
    return ClientData(x[:limit], y[:limit]) if limit is not None else ClientData(x, y)


def femnist(
    path: str | Path,
    *,
    rounds: int = 100,
    clients_per_round: int = 10,
    client_lr: float = 0.06,
    batch_size: int = 20,
    seed: int = 0,
    device: str = "cpu",
) -> Workload:
    """W2: LEAF FEMNIST, one client per writer, the LEAF/TFF CNN (``zoo.femnist_cnn``), 10 writers
    per round, 1 local epoch, batch 20, SGD lr 0.06, FedAvg (Caldas et al., "LEAF: A Benchmark
    for Federated Settings", 2018). The test set is all writers' own test splits.

    Args:
        path: the FEMNIST data (see ``hefl.data.load_femnist``), e.g.
            ``../shared/data/femnist_leaf``.
        device: where the model adapter trains and evaluates (``"cpu"``, ``"cuda"``).

    Example:
        >>> w = femnist("../shared/data/femnist_leaf")  # doctest: +SKIP
        >>> len(w.data), w.clients_per_round  # doctest: +SKIP
        (105, 10)
    """
    from hefl.data.loaders import load_femnist
    from hefl.models.torch import TorchModel
    from hefl.models.zoo import femnist_cnn

    data = load_femnist(path)
    return Workload(
        name="femnist",
        model=TorchModel(femnist_cnn, seed=seed, device=device),
        data=data,
        test=_pooled_test(data),
        client_lr=client_lr,
        batch_size=batch_size,
        rounds=rounds,
        clients_per_round=clients_per_round,
    )


def shakespeare(
    path: str | Path,
    *,
    rounds: int = 100,
    clients_per_round: int = 10,
    client_lr: float = 1.47,
    batch_size: int = 10,
    seq_len: int = 80,
    seed: int = 0,
    test_limit: int | None = None,
    device: str = "cpu",
) -> Workload:
    """W3: TFF Shakespeare, one client per speaking role, next-character prediction over
    sequences of 80, ``zoo.CharLSTM`` (embedding 8, 2-layer LSTM 256), padding (id 0) left out of
    loss and accuracy, 10 roles per round, 1 local epoch, batch 10, SGD lr 1.47 (the FedAvg
    paper's Shakespeare setting: McMahan et al., AISTATS 2017). The test set is all roles' own
    test splits.

    Args:
        path: folder with ``shakespeare_train.h5`` / ``shakespeare_test.h5``, e.g.
            ``../shared/data/shakespeare_tff``.
        test_limit: evaluate on the first ``test_limit`` test sequences only (the full set is
            4,606 sequences of 80 characters: seconds per evaluation on a CPU).
        device: where the model adapter trains and evaluates (``"cpu"``, ``"cuda"``).

    Example:
        >>> w = shakespeare("../shared/data/shakespeare_tff")  # doctest: +SKIP
        >>> len(w.data)  # doctest: +SKIP
        715
    """
    from functools import partial

    from hefl.data.loaders import PAD, SHAKESPEARE_VOCAB, load_shakespeare
    from hefl.models.torch import TorchModel
    from hefl.models.zoo import CharLSTM

    if test_limit is not None and test_limit < 1:
        raise ConfigError(f"test_limit must be >= 1, got {test_limit}")
    data = load_shakespeare(path, seq_len=seq_len)
    return Workload(
        name="shakespeare",
        model=TorchModel(
            partial(CharLSTM, SHAKESPEARE_VOCAB), seed=seed, ignore_index=PAD, device=device
        ),
        data=data,
        test=_pooled_test(data, test_limit),
        client_lr=client_lr,
        batch_size=batch_size,
        rounds=rounds,
        clients_per_round=clients_per_round,
    )


#: Model kinds a tabular federation trains (both score under encryption).
TABULAR_MODELS = ("logreg", "mlp")


def tabular(
    source: Any,
    target: str,
    *,
    sep: str | None = None,
    drop: Sequence[str] = (),
    by: str | None = None,
    clients: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    model: str = "logreg",
    hidden: int = 16,
    positive: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    rounds: int = 20,
    client_lr: float | None = None,
    batch_size: int = 64,
) -> Workload:
    """A binary classification CSV (or DataFrame) as a federation: a stratified ``test_size``
    held out, the rest split by column ``by`` (every party takes part in every round: a
    cross-silo federation) or into ``clients`` parties (10 per round), preprocessing fitted from
    the parties' summed statistics (``hefl.data.parties.split_table``).

    Args:
        source: a CSV path (``.gz`` allowed; separator sniffed unless ``sep``), a DataFrame or
            a ``Table``.
        model: ``logreg`` (numpy logistic regression) or ``mlp`` (one hidden layer of
            ``hidden`` units, quadratic activation: ``hefl.inference.mlp``); both export to a
            model file that scores encrypted records.
        client_lr: default 0.2 for ``logreg``, 0.05 for ``mlp``.

    Example:
        >>> w = tabular("bank-full.csv.gz", "y", drop=["duration"], by="job")  # doctest: +SKIP
        >>> w.export(result.params).save("model.json")  # doctest: +SKIP
    """
    from hefl.data.parties import split_table
    from hefl.data.tabular import Table, read_csv
    from hefl.inference.model import LinearModel, ModelFile

    if model not in TABULAR_MODELS:
        raise ConfigError(f"--model {model!r}: a CSV federation trains "
                          f"{' or '.join(TABULAR_MODELS)} (both score encrypted); a Keras model "
                          "file trains on --dataset")
    if isinstance(source, (str, Path)):
        table = read_csv(source, sep=sep, drop=drop)
    else:
        table = Table.from_frame(source)
        table = table.drop(*drop) if drop else table
    if by is None and clients is None:
        clients = 10
    split = split_table(table, target, by=by, clients=clients, partition=partition, alpha=alpha,
                        seed=seed, test_size=test_size, positive=positive)
    pre = split.preprocessing
    n = pre.n_features
    if model == "logreg":
        from hefl.models.linear import LogisticRegressionModel

        adapter: Any = LogisticRegressionModel(n)

        def export(vector: np.ndarray) -> ModelFile:
            return ModelFile(LinearModel.from_hefl(adapter, vector), pre)
    else:
        from hefl.inference.mlp import from_torch, poly_mlp_classifier
        from hefl.models.torch import TorchModel

        adapter = TorchModel(lambda: poly_mlp_classifier(n, hidden), seed=seed)

        def export(vector: np.ndarray) -> ModelFile:
            adapter.set_vector(vector)
            return ModelFile(from_torch(adapter.module), pre)

    data = split.federated()
    return Workload(
        name="csv",
        model=adapter,
        data=data,
        test=split.test_data(),
        client_lr=client_lr if client_lr is not None else (0.2 if model == "logreg" else 0.05),
        batch_size=batch_size,
        rounds=rounds,
        clients_per_round=len(data) if by is not None else min(10, len(data)),
        export=export,
        split=split,
    )


def set_torch_threads(threads: int = 1) -> None:
    """W1 runs torch with one intra-op thread."""
    import torch

    torch.set_num_threads(threads)


def summary(result: Any) -> dict[str, Any]:
    """Final metrics of a SimulationResult as plain numbers."""
    final = result.history.records[-1] if len(result.history) else None
    per_client = [r.upload_bytes / r.contributors for r in result.history if r.contributors]
    return {
        "rounds": len(result.history),
        "final_accuracy": None if final is None else final.metrics.get("test_accuracy"),
        "final_loss": None if final is None else final.metrics.get("test_loss"),
        "mean_upload_bytes": float(np.mean([r.upload_bytes for r in result.history]))
        if len(result.history)
        else 0.0,
        "upload_bytes_per_client": float(np.mean(per_client)) if per_client else 0.0,
        **{f"median_{k}": _median([getattr(r, k) for r in result.history])
           for k in ("wall_s", "encode_s", "aggregate_s", "decode_s")},
    }


def _median(values: list[float | None]) -> float | None:
    """Median of the measured values (None where none was measured)."""
    seen = [v for v in values if v is not None]
    return float(np.median(seen)) if seen else None
