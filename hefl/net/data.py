"""A client's local data on disk: an ``.npz`` with arrays ``x`` and ``y``.

``write_federated(data, out)`` writes one file per client (``NAME.npz``) plus ``test.npz`` so a
demo or a test can hand each client process its own shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hefl.data.federated import ClientData, FederatedData
from hefl.errors import DataError


def save_client_data(path: str | Path, data: ClientData) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, x=data.x, y=data.y)
    return p


def load_client_data(path: str | Path) -> ClientData:
    """Read ``x`` and ``y`` from an ``.npz`` (no pickle).

    Raises:
        DataError: missing file, not an npz, or no ``x``/``y`` arrays.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DataError(f"{str(p)!r} must hold arrays 'x' and 'y', found {z.files}")
            return ClientData(z["x"], z["y"])
    except FileNotFoundError as e:
        raise DataError(f"client data {str(p)!r} not found; pass --data PATH to an .npz") from e
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read client data {str(p)!r}: {e}") from e


def write_federated(
    data: FederatedData, out: str | Path, names: Sequence[str], test: ClientData | None = None
) -> list[Path]:
    """One ``NAME.npz`` per client, in ``data``'s client order, plus ``test.npz`` if given."""
    if len(names) != len(data):
        raise DataError(f"{len(names)} names for {len(data)} clients")
    out = Path(out)
    shards = zip(names, data.train.values(), strict=True)
    paths = [save_client_data(out / f"{n}.npz", d) for n, d in shards]
    if test is not None:
        save_client_data(out / "test.npz", test)
    return paths
