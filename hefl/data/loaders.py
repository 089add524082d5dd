"""Loaders for the data sets hefl ships presets for. Each takes a path; nothing downloads.

- ``load_digits``: scikit-learn's bundled digits, split and scaled exactly as workload W1.
- ``load_femnist``: LEAF FEMNIST by writer, from the packed npz or LEAF's JSON shards.
- ``load_shakespeare``: TFF's Shakespeare h5 by speaking role, as next-character sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hefl.data.federated import ClientData, FederatedData
from hefl.errors import DataError


@dataclass(frozen=True)
class Pooled:
    """A centrally held train/test split (before it is divided among clients)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(seed: int = 0) -> Pooled:
    """W1: ``load_digits`` -> ``train_test_split(test_size=0.2, random_state=seed)`` ->
    ``StandardScaler`` fit on train. Features float32, labels int64."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = _load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    return Pooled(
        scaler.transform(x_tr).astype(np.float32),
        y_tr.astype(np.int64),
        scaler.transform(x_te).astype(np.float32),
        y_te.astype(np.int64),
    )


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{what} not found at {str(p)!r}; pass the path to the data on this machine"
        )
    return p


def _femnist_images(x: np.ndarray) -> np.ndarray:
    """uint8 white-background images -> float32 (N, 1, 28, 28) in MNIST polarity, in [0, 1]."""
    return ((255.0 - x.astype(np.float32)) / 255.0).reshape(-1, 1, 28, 28)


def load_femnist(path: str | Path) -> FederatedData:
    """LEAF FEMNIST, one client per writer, with each writer's own test split.

    Args:
        path: the packed ``.npz`` (keys x_train, y_train, client_train, x_test, y_test,
            client_test, client_ids), or a folder of LEAF JSON shards ``*_train_*.json`` /
            ``*_test_*.json``, or a folder containing the npz.
    """
    p = _existing(path, "FEMNIST data")
    if p.is_dir():
        npz = sorted(p.glob("*.npz"))
        if npz:
            p = npz[0]
        else:
            json_dir = p / "raw_leaf_json" if (p / "raw_leaf_json").is_dir() else p
            return _load_leaf_json(json_dir)
    try:
        z = np.load(p, allow_pickle=False)
        ids = [str(c) for c in z["client_ids"]]
        train, test = {}, {}
        for i, wid in enumerate(ids):
            m = z["client_train"] == i
            train[wid] = ClientData(
                _femnist_images(z["x_train"][m]), z["y_train"][m].astype(np.int64)
            )
            m = z["client_test"] == i
            test[wid] = ClientData(_femnist_images(z["x_test"][m]), z["y_test"][m].astype(np.int64))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read FEMNIST npz {str(p)!r}: {e}") from e
    return FederatedData(train, test)


def _load_leaf_json(folder: Path) -> FederatedData:
    def read(kind: str) -> dict[str, ClientData]:
        out: dict[str, ClientData] = {}
        for f in sorted(folder.glob(f"*_{kind}_*.json")):
            try:
                doc = json.loads(f.read_text())
                for uid in doc["users"]:
                    ud = doc["user_data"][uid]
                    x = np.asarray(ud["x"], np.float32).reshape(-1, 1, 28, 28)
                    out[uid] = ClientData(1.0 - x, np.asarray(ud["y"], np.int64))
            except (OSError, KeyError, ValueError) as e:
                raise DataError(f"cannot read LEAF JSON shard {str(f)!r}: {e}") from e
        return out

    train = read("train")
    if not train:
        raise DataError(f"no LEAF '*_train_*.json' shards in {str(folder)!r}")
    return FederatedData(train, read("test"))


# TFF's Shakespeare character vocabulary (tff.simulation.datasets.shakespeare tutorial).
SHAKESPEARE_CHARS = list(
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
PAD, OOV, BOS, EOS = (
    0,
    len(SHAKESPEARE_CHARS) + 1,
    len(SHAKESPEARE_CHARS) + 2,
    len(SHAKESPEARE_CHARS) + 3,
)
SHAKESPEARE_VOCAB = len(SHAKESPEARE_CHARS) + 4  # pad + chars + oov + bos + eos
_CHAR_ID = {c: i + 1 for i, c in enumerate(SHAKESPEARE_CHARS)}


def shakespeare_sequences(snippets: list[str], seq_len: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Snippets -> (x, y) next-character pairs of length ``seq_len``, as in TFF's tutorial:
    each snippet becomes [BOS] chars [EOS], cut into pieces of ``seq_len + 1``, padded with 0."""
    ids: list[int] = []
    for s in snippets:
        ids.append(BOS)
        ids.extend(_CHAR_ID.get(c, OOV) for c in s)
        ids.append(EOS)
    n = -(-len(ids) // (seq_len + 1)) if ids else 0
    arr = np.zeros(n * (seq_len + 1), np.int64)
    arr[: len(ids)] = ids
    rows = arr.reshape(n, seq_len + 1)
    return rows[:, :-1], rows[:, 1:]


def load_shakespeare(path: str | Path, seq_len: int = 80) -> FederatedData:
    """TFF Shakespeare, one client per speaking role.

    Args:
        path: folder holding ``shakespeare_train.h5`` and ``shakespeare_test.h5``.
    """
    import h5py

    folder = _existing(path, "Shakespeare data")

    def read(name: str) -> dict[str, ClientData]:
        f_path = folder / name
        if not f_path.exists():
            raise DataError(f"{name} not found in {str(folder)!r}")
        out = {}
        try:
            with h5py.File(f_path, "r") as f:
                for cid in f["examples"]:
                    snippets = [s.decode("utf-8") for s in f["examples"][cid]["snippets"][()]]
                    out[cid] = ClientData(*shakespeare_sequences(snippets, seq_len))
        except (OSError, KeyError) as e:
            raise DataError(f"cannot read {str(f_path)!r}: {e}") from e
        return out

    return FederatedData(read("shakespeare_train.h5"), read("shakespeare_test.h5"))
