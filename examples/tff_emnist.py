"""TensorFlow Federated's "Federated Learning for Image Classification" tutorial, ported to hefl:
a Keras model, EMNIST handwriting split by writer, FedAvg over 10 writers a round.

    python examples/tff_emnist.py [--data ../shared/data/femnist_leaf] [--rounds 20]
        [--backend sequential|vectorized] [--clients-per-round 10] [--model leaf|small]
        [--torch [--torch-init keras|torch]] [--dtype float32|float64] [--save params.npy]

The TFF tutorial's steps, one by one (docs/tff-migration.md has the side-by-side table):

1. ``tff.simulation.datasets.emnist.load_data()`` -> ``hefl.data.loaders.load_femnist(path)``:
   LEAF FEMNIST (the same NIST writers, 62 classes), one client per writer, each with its own
   test split, from a local path (nothing downloads).
2. ``create_keras_model()`` + ``tff.learning.models.from_keras_model(...)`` ->
   ``hefl.models.KerasModel(create_keras_model)``: Keras 3 on its PyTorch backend. The model is
   the LEAF CNN (``--model leaf``, W2's, 6.6 M parameters) or a smaller CNN (``--model small``);
   the convolutions are ``channels_first`` because hefl's images are (N, 1, 28, 28), which also
   lets the vectorized backend batch them.
3. ``tff.learning.algorithms.build_weighted_fed_avg(model_fn, client_optimizer_fn=SGD(lr))`` ->
   ``hefl.algorithms.fedavg(client_lr=..., batch_size=...)``: weighted FedAvg, server SGD lr 1.
4. ``state = process.initialize()`` / ``for round: state, metrics = process.next(state, data)``
   -> one ``hefl.simulate(model, data, algorithm, rounds=R, clients_per_round=K, test=...)``
   call (``on_round`` sees each round's metrics as ``process.next`` returned them).
5. evaluation (``tff.learning.build_federated_evaluation`` / ``algorithms.build_fed_eval``) ->
   ``test=`` (the writers' pooled test splits, every round) and ``model.evaluate(params, data)``.

``--torch`` trains the equivalent torch module (``hefl.models.zoo.femnist_cnn`` for ``leaf``)
the same way, starting from the Keras model's initial weights (``hefl.models.keras.torch_layout``;
``--torch-init torch`` for torch's own initialisation instead), for comparison. The last line of
output is a JSON summary (final test accuracy, wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hefl.data.tabular import shared_data

DEFAULT = shared_data("femnist_leaf")
CF = "channels_first"  # hefl's FEMNIST images are (N, 1, 28, 28)


def keras_cnn(kind: str = "leaf", classes: int = 62) -> Any:
    """``leaf``: the LEAF/TFF CNN (conv5x5 32, pool, conv5x5 64, pool, dense 2048, dense 62), the
    Keras twin of ``hefl.models.zoo.femnist_cnn``; ``small``: conv5x5 16, pool, conv5x5 32,
    pool, dense 128, dense 62 (a quick run on a CPU)."""
    from hefl.models.keras import import_keras

    keras = import_keras()
    c1, c2, dense = (32, 64, 2048) if kind == "leaf" else (16, 32, 128)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((1, 28, 28)),
        layers.Conv2D(c1, 5, padding="same", activation="relu", data_format=CF),
        layers.MaxPooling2D(2, data_format=CF),
        layers.Conv2D(c2, 5, padding="same", activation="relu", data_format=CF),
        layers.MaxPooling2D(2, data_format=CF),
        layers.Flatten(),
        layers.Dense(dense, activation="relu"),
        layers.Dense(classes),  # logits (a final softmax: KerasModel(..., outputs="probabilities"))
    ])


def torch_cnn(kind: str = "leaf", classes: int = 62) -> Any:
    """The torch module equivalent to ``keras_cnn(kind)`` (same layers, same flatten order)."""
    from torch import nn

    from hefl.models.zoo import femnist_cnn

    if kind == "leaf":
        return femnist_cnn(classes)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def pooled_test(data: Any) -> Any:
    """Every writer's own test split, concatenated (TFF's ``emnist_test.create_tf_dataset_from_
    all_clients()``)."""
    from hefl.data.federated import ClientData

    parts = [d for d in data.test.values() if len(d)]
    return ClientData(np.concatenate([d.x for d in parts]), np.concatenate([d.y for d in parts]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT, help="LEAF FEMNIST (npz or JSON)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--backend", choices=("sequential", "vectorized"), default="sequential")
    ap.add_argument("--model", choices=("leaf", "small"), default="leaf")
    ap.add_argument("--client-lr", type=float, default=0.06, help="W2's SGD step size")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch", action="store_true", help="train the equivalent torch model")
    ap.add_argument("--torch-init", choices=("keras", "torch"), default="keras",
                    help="--torch: start from the Keras model's weights, or torch's own init")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--save", type=Path, help="write the final global vector (.npy)")
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(f"FEMNIST not found at {args.data}; pass --data (LEAF FEMNIST by writer)",
              file=sys.stderr)
        return 2

    import torch

    from hefl import simulate
    from hefl.algorithms import fedavg
    from hefl.data.loaders import load_femnist
    from hefl.models import KerasModel, TorchModel
    from hefl.models.keras import torch_layout

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    data = load_femnist(args.data)  # 1. client data: writer id -> (images, labels)
    test = pooled_test(data)
    # 2. the Keras model (built after keras.utils.set_random_seed(seed))
    keras_model = KerasModel(lambda: keras_cnn(args.model), seed=args.seed, dtype=dtype)
    model: Any = keras_model
    initial = keras_model.init_vector()
    if args.torch:
        model = TorchModel(lambda: torch_cnn(args.model), seed=args.seed, dtype=dtype)
        initial = (torch_layout(keras_model, initial) if args.torch_init == "keras"
                   else model.init_vector())
    # 3. the algorithm: weighted FedAvg, client SGD
    algorithm = fedavg(client_lr=args.client_lr, epochs=args.epochs, batch_size=args.batch_size)

    def on_round(r: Any) -> None:  # what process.next(state, data) returned, round by round
        acc = r.metrics.get("test_accuracy", float("nan"))
        print(f"round {r.round:3d}  train loss {r.train_loss:.4f}  test accuracy {acc:.4f}  "
              f"{r.wall_s:.1f} s", flush=True)

    t0 = time.perf_counter()
    # 4. + 5. initialize / next for R rounds, evaluating on the pooled test splits
    result = simulate(
        model, data, algorithm, rounds=args.rounds, clients_per_round=args.clients_per_round,
        seed=args.seed, test=test, backend=args.backend, on_round=on_round, progress=False,
        initial_params=initial,
        backend_options={"device": "cpu"} if args.backend == "vectorized" else None,
    )
    wall = time.perf_counter() - t0
    final = model.evaluate(result.params, test)
    if args.save is not None:
        np.save(args.save, result.params, allow_pickle=False)
    print(json.dumps({
        "framework": "torch" if args.torch else "keras",
        "model": args.model,
        "params": int(model.spec.size),
        "backend": args.backend,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "clients": len(data),
        "clients_per_round": args.clients_per_round,
        "init": (args.torch_init if args.torch else "keras"),
        "final_accuracy": round(float(final["accuracy"]), 4),
        "final_loss": round(float(final["loss"]), 4),
        "wall_s": round(wall, 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
