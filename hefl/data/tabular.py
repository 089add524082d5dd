"""Tabular data: read a CSV, and the preprocessing a model owner fits and ships with a model.

``read_csv`` parses any delimited file (optionally gzipped) with the standard library and keeps
every column as strings; ``Preprocessor.fit`` decides which columns are numeric (every value
parses as a number) and which are categorical, then one-hot encodes categoricals and standardises
numerics. The fitted preprocessor is plain JSON (``to_dict`` / ``from_dict``), so it travels with a
model file and the data owner applies exactly the same transform before encrypting.

Unknown categories at transform time map to the all-zeros one-hot vector (the model then scores
that column at its intercept's baseline); the count of such values is reported, never silently
lost. Missing or NaN numeric values are an error naming the column and rows: impute them first.

Example:
    >>> t = Table.from_rows(["x", "c", "y"], [["1", "a", "no"], ["3", "b", "yes"]])
    >>> pre = Preprocessor.fit(t, target="y")
    >>> pre.feature_names
    ('x', 'c=a', 'c=b')
    >>> pre.transform(t).tolist()
    [[-1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    >>> pre.labels(t).tolist()
    [0, 1]
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hefl.errors import ConfigError, DataError

_MISSING = {"", "na", "nan", "null", "none", "?"}
#: Missing in a text column: fewer words, since ``none`` or ``null`` can be real levels (credit-g's
#: ``other_parties = none``); ``?`` is the UCI files' mark.
_MISSING_TEXT = {"", "na", "n/a", "nan", "?"}


@dataclass(frozen=True)
class Table:
    """Columns of strings, all the same length, in file order.

    Attributes:
        columns: column name -> its values as strings.
        sep: the separator of the file it was read from (``None``: not read from a file); a
            model fitted on it remembers the separator, so its data owners need no ``--sep``.
    """

    columns: Mapping[str, np.ndarray]
    sep: str | None = field(default=None, compare=False)

    @classmethod
    def from_rows(cls, header: Sequence[str], rows: Sequence[Sequence[str]],
                  sep: str | None = None) -> Table:
        arr = np.asarray(rows, dtype=object).reshape(len(rows), len(header))
        return cls({h: arr[:, i].astype(str) for i, h in enumerate(header)}, sep)

    @classmethod
    def from_frame(cls, frame: Any) -> Table:
        """A pandas (or any) DataFrame: every column as strings, missing values (``None``,
        ``NaN``) as ``""`` so they are reported like a blank CSV field. A ``Table`` is returned
        as it is."""
        if isinstance(frame, Table):
            return frame
        if not hasattr(frame, "columns"):
            raise DataError(f"expected a DataFrame (pandas) or a hefl Table, got "
                            f"{type(frame).__name__}")

        cols = {}
        for name in frame.columns:
            column = frame[name]
            values = np.asarray(column, dtype=object)
            # pandas' own missing values (None, NaN, pd.NA, NaT) by pandas' own test
            missing = (np.asarray(column.isna(), dtype=bool) if hasattr(column, "isna") else
                       np.array([v is None or (isinstance(v, float) and math.isnan(v))
                                 for v in values], dtype=bool))
            cols[str(name)] = np.array(["" if m else str(v) for v, m in
                                        zip(values, missing, strict=True)], dtype=str)
        if not cols:
            raise DataError("the DataFrame has no columns")
        return cls(cols)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            raise DataError(
                f"column {name!r} is not in the data (columns: {', '.join(self.names)})"
            ) from None

    def target(self, name: str) -> np.ndarray:
        """The label column ``name``; its absence is reported as a wrong ``--target``."""
        if name not in self.columns:
            raise DataError(f"target column {name!r} is not in the data (columns: "
                            f"{', '.join(self.names)}); pass --target with one of them")
        return self.columns[name]

    def take(self, rows: np.ndarray) -> Table:
        return Table({k: v[rows] for k, v in self.columns.items()}, self.sep)

    def drop(self, *names: str) -> Table:
        unknown = [n for n in names if n not in self.columns]
        if unknown:
            raise DataError(f"cannot drop {', '.join(map(repr, unknown))}: not a column (columns: "
                            f"{', '.join(self.names)})")
        return Table({k: v for k, v in self.columns.items() if k not in names}, self.sep)

    def write_csv(self, path: str | Path, sep: str | None = None) -> Path:
        """Write a header line and the rows (separator: ``sep``, else the one it was read with,
        else ``,``). ``" "`` is written as a single space."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter=sep or self.sep or ",")
            w.writerow(self.names)
            w.writerows(zip(*self.columns.values(), strict=True))
        return p


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


#: Separators ``sniff_sep`` chooses between (``" "``: runs of spaces, as in German credit).
SEPARATORS = (",", ";", "\t", "|")


def sniff_sep(path: str | Path, sample_bytes: int = 65536) -> str:
    r"""The separator of a delimited file, read off its first lines: the one of ``SEPARATORS``
    that splits every sampled line into the same number (> 1) of fields, the most fields
    winning; else ``" "`` if runs of spaces do; else ``","`` (a one-column file).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "bank.csv"
        >>> _ = p.write_text('age;job;"y"\n30;"admin.";no\n41;"blue-collar";yes\n')
        >>> sniff_sep(p)
        ';'
    """
    with _open_text(Path(path)) as f:
        sample = f.read(sample_bytes)
    lines = [ln for ln in sample.splitlines() if ln.strip()]
    if len(lines) > 1 and len(sample) >= sample_bytes:
        lines = lines[:-1]  # the last line may be cut off by the sample
    best, fields = ",", 1
    for sep in SEPARATORS:
        counts = {len(r) for r in csv.reader(lines, delimiter=sep)}
        if len(counts) == 1 and (n := counts.pop()) > fields:
            best, fields = sep, n
    if fields == 1:
        counts = {len(ln.split()) for ln in lines}
        if len(counts) == 1 and counts.pop() > 1:
            return " "
    return best


def read_csv(
    path: str | Path,
    sep: str | None = None,
    header: Sequence[str] | None = None,
    drop: Iterable[str] = (),
    no_header: bool = False,
) -> Table:
    """Read a delimited text file (``.gz`` allowed) into a ``Table`` of strings.

    Args:
        path: the file.
        sep: field separator (``" "`` splits on runs of spaces); ``None``: found by
            ``sniff_sep`` and kept as ``Table.sep``.
        header: column names when the file has no header line.
        drop: columns to leave out (e.g. ``duration`` in the bank data, which leaks the label).
        no_header: the file has no header line and no ``header`` is given: name the columns
            ``c1, c2, ...``.

    Raises:
        DataError: file missing or empty, or a row whose field count differs from the header
            (the message gives the line number).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file not found at {str(p)!r}; pass the path to an existing file")
    sep = sniff_sep(p) if sep is None else {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    if len(sep) != 1:
        raise DataError(f"separator {sep!r} must be one character (write a tab as '\\t' or "
                        "'tab'); leave --sep out to have it found")
    with _open_text(p) as f:
        if sep == " ":
            lines = (ln.split() for ln in f if ln.strip())
        else:
            lines = (r for r in csv.reader(f, delimiter=sep) if r)
        first_row = None
        names: list[str] | None
        if header is not None:
            names = list(header)
        else:
            names = next(lines, None)
            if no_header and names:
                first_row, names = names, [f"c{i}" for i in range(1, len(names) + 1)]
        if not names:
            raise DataError(f"{str(p)!r} is empty: expected a header line and rows")
        names = [n.strip() for n in names]
        rows = [] if first_row is None else [[v.strip() for v in first_row]]
        first_line = 2 if header is None else 1  # line number of the loop's first row
        for i, r in enumerate(lines):
            if len(r) != len(names):
                raise DataError(
                    f"{p.name} line {i + first_line}: {len(r)} fields, the header has "
                    f"{len(names)} (separator {sep!r}); check the separator (--sep) and quoting"
                )
            rows.append([v.strip() for v in r])
    if not rows:
        raise DataError(f"{str(p)!r} has a header but no rows")
    table = Table.from_rows(names, rows, sep)
    return table.drop(*drop) if drop else table


def as_float(values: np.ndarray) -> np.ndarray | None:
    """Parse a string column as float, or None if any non-missing value is not a number."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        s = v.strip().lower()
        if s in _MISSING:
            out[i] = math.nan
            continue
        try:
            out[i] = float(s)
        except ValueError:
            return None
    return out


@dataclass(frozen=True)
class Column:
    """How one input column becomes model features.

    Attributes:
        name: column name.
        kind: ``"numeric"`` (standardised) or ``"categorical"`` (one-hot).
        mean: numeric mean (training data).
        std: numeric standard deviation (1 if constant).
        categories: categorical levels seen in training, in sorted order.
    """

    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    categories: tuple[str, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        if self.kind == "numeric":
            return (self.name,)
        return tuple(f"{self.name}={c}" for c in self.categories)


@dataclass(frozen=True)
class Preprocessor:
    """One-hot categoricals + standardised numerics, fitted on training data, JSON-portable.

    Attributes:
        target: label column name.
        positive: the label value that is class 1.
        columns: per input column, how it is encoded (in feature order).
        sep: the training file's separator, used for the data owners' files unless they say
            otherwise (``None``: not known).
        unknown_counts: filled by ``transform_report``; not part of the JSON.
    """

    target: str
    positive: str
    columns: tuple[Column, ...]
    sep: str | None = None
    unknown_counts: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f for c in self.columns for f in c.features)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def fit(
        cls,
        table: Table,
        target: str,
        positive: str | None = None,
        columns: Sequence[str] | None = None,
        stats: Mapping[str, tuple[float, float]] | None = None,
    ) -> Preprocessor:
        """Fit on training rows.

        Args:
            table: training data including the target column.
            target: label column (two distinct values).
            positive: label value for class 1; by default the ``yes``/``1``/``true``/``y``/
                ``bad`` of such a pair, else the larger of two numbers (German credit: 2 = bad),
                else the second in sorted order.
            columns: input columns to use (default: all but the target).
            stats: optional ``{numeric column: (mean, std)}`` to use instead of fitting them
                (e.g. computed under encryption by ``hefl.analytics``).

        Raises:
            DataError: target missing or not binary, or a column with missing values (blank,
                ``NA``, ...): a text column's blanks would otherwise become a category of
                their own.
        """
        labels = table.target(target)
        positive = positive if positive is not None else default_positive(labels)
        if positive not in set(labels):
            raise DataError(f"positive label {positive!r} does not occur in column {target!r}")
        names = [c for c in (columns or table.names) if c != target]
        cols = []
        for name in names:
            raw = table[name]
            num = as_float(raw)
            if num is None:
                check_text_complete(name, raw)
                levels = tuple(sorted(str(v) for v in set(raw)))
                cols.append(Column(name, "categorical", categories=levels))
                continue
            check_finite(name, num)
            if stats and name in stats:
                mean, std = stats[name]
            else:
                mean, std = float(num.mean()), float(num.std())
            cols.append(Column(name, "numeric", mean=float(mean), std=float(std) or 1.0))
        return cls(target, str(positive), tuple(cols), table.sep)

    def labels(self, table: Table) -> np.ndarray:
        """0/1 labels (``positive`` -> 1).

        Raises:
            DataError: the target column is missing, or holds a third value.
        """
        y = table[self.target]
        values = set(np.unique(y))
        if len(values) > 2:
            raise DataError(f"target {self.target!r} has {len(values)} distinct values "
                            f"({sorted(values)[:5]}...); a binary target is needed")
        return (y == self.positive).astype(np.int64)

    def transform(self, table: Table) -> np.ndarray:
        """Feature matrix (rows x ``n_features``), float64; see ``transform_report``."""
        return self.transform_report(table)[0]

    def transform_report(self, table: Table) -> tuple[np.ndarray, dict[str, int]]:
        """Feature matrix and ``{column: number of unknown categories mapped to zeros}``.

        Raises:
            DataError: a needed column is missing, or a numeric value is missing / not a number.
        """
        missing = [c.name for c in self.columns if c.name not in table.columns]
        if missing:
            raise DataError(
                f"the data lacks columns the model needs: {', '.join(missing)}; score a CSV with "
                "the same columns as the training data"
            )
        n = len(table)
        parts: list[np.ndarray] = []
        unknown: dict[str, int] = {}
        for c in self.columns:
            raw = table[c.name]
            if c.kind == "numeric":
                num = as_float(raw)
                if num is None:
                    bad = [i for i, v in enumerate(raw) if as_float(np.array([v])) is None]
                    raise DataError(
                        f"column {c.name!r} must be numeric but rows {bad[:5]} hold "
                        f"{[raw[i] for i in bad[:5]]}; fix those values"
                    )
                check_finite(c.name, num)
                parts.append(((num - c.mean) / c.std)[:, None])
            else:
                index = {v: i for i, v in enumerate(c.categories)}
                codes = np.array([index.get(v, -1) for v in raw], dtype=np.int64)
                onehot = np.zeros((n, len(c.categories)))
                known = codes >= 0
                onehot[np.flatnonzero(known), codes[known]] = 1.0
                if (~known).any():
                    unknown[c.name] = int((~known).sum())
                parts.append(onehot)
        x = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0))
        return x, unknown

    def to_dict(self) -> dict:
        return {
            "format": "hefl-preprocessing/1",
            "target": self.target,
            "positive": self.positive,
            **({"sep": self.sep} if self.sep is not None else {}),
            "unknown_categories": "all-zeros one-hot",
            "columns": [
                {"name": c.name, "kind": c.kind, "mean": c.mean, "std": c.std}
                if c.kind == "numeric"
                else {"name": c.name, "kind": c.kind, "categories": list(c.categories)}
                for c in self.columns
            ],
        }

    @classmethod
    def load(cls, path: str | Path) -> Preprocessor:
        """A ``hefl-preprocessing/1`` JSON file (``hefl split-data --csv``, ``hefl infer
        export-preprocessing``, or written by hand from a public schema), or a model file's
        ``preprocessing`` part.

        Raises:
            ConfigError: missing or not JSON; DataError: malformed.
        """
        import json

        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read preprocessing file {str(p)!r}: {e}") from e
        except ValueError as e:
            raise ConfigError(f"{str(p)!r} is not JSON: {e}") from e
        return cls.from_dict(d.get("preprocessing", d) if isinstance(d, dict) else d)

    @classmethod
    def from_dict(cls, d: Mapping) -> Preprocessor:
        """Parse ``to_dict`` output.

        Raises:
            DataError: malformed.
        """
        try:
            cols = tuple(
                Column(c["name"], "numeric", float(c["mean"]), float(c["std"]))
                if c["kind"] == "numeric"
                else Column(c["name"], "categorical", categories=tuple(map(str, c["categories"])))
                for c in d["columns"]
            )
            sep = d.get("sep")
            return cls(str(d["target"]), str(d["positive"]), cols,
                       None if sep is None else str(sep))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed preprocessing JSON: {e!r}") from e


def check_text_complete(name: str, raw: np.ndarray) -> None:
    """A text column must have no missing values: one-hot encoding would silently make
    ``""``/``NA`` a category of its own (a bank's blank ``job`` is not a job)."""
    bad = np.flatnonzero([v.strip().lower() in _MISSING_TEXT for v in raw])
    if len(bad):
        shown = sorted({str(raw[i]) for i in bad[:50]})
        raise DataError(
            f"text column {name!r} has {len(bad)} missing values ({shown!r}; rows "
            f"{bad[:5].tolist()}, counted from 0 after the header); fill them with a level of their own (e.g. 'unknown') or "
            f"leave the column out (--drop {name})"
        )


def check_complete(table: Table, target: str) -> None:
    """Every text column (all but ``target``) free of blanks and ``NA``: see
    ``check_text_complete``. Numeric columns are checked where they are parsed."""
    for name in table.names:
        if name != target and as_float(table[name]) is None:
            check_text_complete(name, table[name])


def check_finite(name: str, num: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(num))
    if len(bad):
        raise DataError(
            f"column {name!r} has {len(bad)} missing/NaN/Inf values (rows {bad[:5].tolist()}); "
            "impute or drop them before scoring"
        )


def default_positive(labels: np.ndarray) -> str:
    values = sorted(set(labels))
    if len(values) != 2:
        raise DataError(f"target has {len(values)} distinct values {values[:5]}; need exactly 2")
    lower = {v.lower(): v for v in values}
    for negative, positive in (("no", "yes"), ("0", "1"), ("false", "true"), ("n", "y"),
                               ("good", "bad")):
        if set(lower) == {negative, positive}:
            return lower[positive]
    nums = as_float(np.array(values))
    if nums is not None and np.isfinite(nums).all():
        return values[int(np.argmax(nums))]
    return values[1]


def stratified_split(y: np.ndarray, test_size: float = 0.2, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, stratified by ``y`` (scikit-learn ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)
    except ValueError as e:  # a class of one row, or a test split smaller than the classes
        raise DataError(f"cannot hold out a stratified {test_size:g} of {len(y)} rows ({e}); "
                        "use more rows, or --test-size 0 to train on every row") from e
    return np.sort(tr), np.sort(te)


# ----------------------------------------------------------------------- shipped data sets


def load_bank(path: str | Path) -> Table:
    """UCI Bank Marketing (``bank-full.csv.gz``, ``;``-separated, target ``y``), without
    ``duration`` (known only after the call: it leaks the label)."""
    return read_csv(path, sep=";", drop=("duration",))


def load_german(path: str | Path) -> Table:
    """UCI Statlog German credit (``german.data``: space-separated, no header; target ``class``,
    2 = bad)."""
    return read_csv(path, sep=" ", header=[f"A{i}" for i in range(1, 21)] + ["class"])


def load_taiwan(path: str | Path) -> Table:
    """UCI default of credit card clients (``UCI_Credit_Card.csv``; target ``Y``), without
    ``ID``."""
    return read_csv(path, drop=("ID",))


def shared_data(*parts: str) -> Path:
    """Where the project's shared data sets live: ``$HEFL_SHARED_DATA``, else ``shared/data``
    beside the repository (or beside the folder holding a git worktree). The path may not exist:
    callers skip or fail with a clear message."""
    import os

    if os.environ.get("HEFL_SHARED_DATA"):
        return Path(os.environ["HEFL_SHARED_DATA"], *parts)
    root = Path(__file__).resolve().parents[2]
    for base in (root.parent, root.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base.joinpath("shared", "data", *parts)
    return root.parent.joinpath("shared", "data", *parts)
