"""A client's local data on disk: an ``.npz`` with arrays ``x`` and ``y``, or a CSV of raw rows
with the federation's preprocessing file (``hefl split-data --csv`` writes both).

``write_federated(data, out)`` writes one file per client (``NAME.npz``) plus ``test.npz`` so a
demo or a test can hand each client process its own shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hefl.data.federated import ClientData, FederatedData
from hefl.data.tabular import Preprocessor
from hefl.errors import ConfigError, DataError

#: Suffixes read as delimited text (anything else must be an ``.npz``).
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".data")


def is_csv(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in CSV_SUFFIXES or (
        p.suffix.lower() == ".gz" and Path(p.stem).suffix.lower() in CSV_SUFFIXES)


def save_client_data(path: str | Path, data: ClientData) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, x=data.x, y=data.y)
    return p


def load_client_data(path: str | Path,
                     preprocessing: Preprocessor | str | Path | None = None,
                     strict: bool = True) -> ClientData:
    """Read ``x`` and ``y`` from an ``.npz`` (no pickle), or a CSV's rows through
    ``preprocessing`` (the separator sniffed, its target as ``y``). ``strict``: a category
    the preprocessing does not know is an error (a training party must encode like the
    others); off for the server's test rows, which score it as the all-zeros one-hot.

    Raises:
        ConfigError: a CSV without preprocessing, or preprocessing for an npz.
        DataError: missing file, not an npz, no ``x``/``y`` arrays, or a CSV that does not fit
            the preprocessing (missing columns, blanks, a third label).
    """
    p = Path(path)
    if is_csv(p):
        if preprocessing is None:
            raise ConfigError(f"{str(p)!r} is a CSV: also pass --preprocessing FILE, the "
                              "federation's preprocessing.json (hefl split-data --csv writes it)")
        from hefl.data.tabular import read_csv

        pre = (preprocessing if isinstance(preprocessing, Preprocessor)
               else Preprocessor.load(preprocessing))
        table = read_csv(p)
        x, unknown = pre.transform_report(table)
        if unknown and strict:
            raise DataError(f"{p.name} holds categories the federation's preprocessing does not "
                            f"know ({unknown}); add them to the schema so every party encodes "
                            "them alike")
        return ClientData(x, pre.labels(table))
    if preprocessing is not None:
        raise ConfigError(f"--preprocessing applies to CSV data; {str(p)!r} is an .npz of "
                          "features already")
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
