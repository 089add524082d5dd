"""Encrypted federated statistics for variable selection.

Several parties (bank branches) each hold rows of the same table. The statistics a bank uses to
choose model variables — per-feature mean and variance, Pearson correlation with the target, and
weight of evidence (WoE) / information value (IV) over binned features — are all functions of
*sums over rows*. Each party therefore computes one flat vector of sufficient statistics, the
vectors are summed through the ``Aggregator`` seam (``hefl.aggregation``: ``encode`` on each
party, ``aggregate`` on the untrusted server, ``decode`` by the key holder), and only the sum is
ever decrypted. Any aggregator works: plaintext, or an additively homomorphic one (CKKS), without
a line changed here.

Each party sends its statistics as *per-row means* with its row count as the weight, so the
aggregator's weighted mean is directly the pooled mean and its total weight is the pooled row
count. Every entry is kept in ``[-1, 1]`` (counts become fractions, numeric values are divided by
a power-of-ten scale), which is what CKKS precision needs. Two rounds:

1. **scale** — for each numeric feature, the fraction of rows with ``|x| <= 10^k``, k = 0..18;
   the pooled result gives a scale ``s = 10^k`` bounding every ``|x|``.
2. **statistics** — ``mean(y)``; per numeric feature ``mean(u), mean(u^2), mean(u*y)`` with
   ``u = x / s``, and a per-class histogram over a fixed fine grid of ``u``; per categorical
   feature, per-class counts of each level.

The key holder turns the decrypted fractions back into counts (rounded to integers: exact),
merges fine cells into up to ``bins`` bins of about equal population, and computes WoE / IV
exactly as ``pooled_stats`` does on pooled plaintext data, so the selected variables are the same.

References:
    Siddiqi, "Credit Risk Scorecards" (Wiley, 2006), ch. 6: WoE and IV for variable selection.
    Thresholds used by default: IV < 0.02 not predictive, 0.02-0.1 weak, 0.1-0.3 medium,
    > 0.3 strong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hefl.aggregation import Aggregator, PlainAggregator
from hefl.data.tabular import (
    Column,
    Preprocessor,
    Table,
    as_float,
    check_finite,
    check_text_complete,
    default_positive,
)
from hefl.errors import ConfigError, DataError, RoundError

DECADES = 19  # |x| <= 10^0 .. 10^18
_LOG_K = 1000.0


@dataclass(frozen=True)
class VariableSpec:
    """The public plan every party follows (a data dictionary, not data).

    Attributes:
        target: label column.
        positive: label value counted as the event (y = 1).
        numeric: numeric columns.
        categorical: categorical column -> its levels (values not listed count as ``"<other>"``).
        grid: fine histogram cells per numeric feature.
        bins: at most this many WoE bins per numeric feature.
    """

    target: str
    positive: str
    numeric: tuple[str, ...]
    categorical: Mapping[str, tuple[str, ...]]
    grid: int = 256
    bins: int = 10

    @classmethod
    def from_schema(cls, table: Table, target: str, positive: str,
                    columns: Sequence[str] | None = None, **kw) -> VariableSpec:
        """Column kinds and categorical levels read off a schema sample (e.g. the data
        dictionary's example rows): numeric if every value parses as a number."""
        numeric, categorical = [], {}
        for name in columns or table.names:
            if name == target:
                continue
            if as_float(table[name]) is None:
                categorical[name] = tuple(sorted(str(v) for v in set(table[name])))
            else:
                numeric.append(name)
        return cls(target, positive, tuple(numeric), categorical, **kw)

    def layout(self) -> dict[str, slice]:
        """Where each block sits in the round-2 statistics vector."""
        out: dict[str, slice] = {"y": slice(0, 1)}
        pos = 1
        for name in self.numeric:
            out[f"{name}:moments"] = slice(pos, pos + 3)
            out[f"{name}:hist"] = slice(pos + 3, pos + 3 + 2 * self.grid)
            pos += 3 + 2 * self.grid
        for name, levels in self.categorical.items():
            n = 2 * (len(levels) + 1)
            out[f"{name}:counts"] = slice(pos, pos + n)
            pos += n
        out["size"] = slice(0, pos)
        return out


# --------------------------------------------------------------------------- per party


def _labels(table: Table, spec: VariableSpec) -> np.ndarray:
    return (table[spec.target] == spec.positive).astype(np.float64)


def _numeric(table: Table, name: str) -> np.ndarray:
    x = as_float(table[name])
    if x is None:
        raise DataError(f"column {name!r} is numeric in the plan but holds non-numbers")
    check_finite(name, x)
    return x


def fine_cell(u: np.ndarray, grid: int) -> np.ndarray:
    """Fine-grid cell of ``u`` in [-1, 1] on a signed log scale (resolves skewed features)."""
    t = np.sign(u) * np.log1p(_LOG_K * np.abs(u)) / math.log1p(_LOG_K)
    return np.clip(((t + 1.0) / 2.0 * grid).astype(np.int64), 0, grid - 1)


def scale_vector(table: Table, spec: VariableSpec) -> np.ndarray:
    """Round 1, one party: fraction of rows with ``|x| <= 10^k`` per numeric feature."""
    out = []
    thresholds = 10.0 ** np.arange(DECADES)
    for name in spec.numeric:
        a = np.abs(_numeric(table, name))
        out.append((a[:, None] <= thresholds[None, :]).mean(axis=0))
    return np.concatenate(out) if out else np.zeros(0)


def stats_vector(table: Table, spec: VariableSpec, scales: Mapping[str, float]) -> np.ndarray:
    """Round 2, one party: its sufficient statistics as per-row means (all in [-1, 1])."""
    lay = spec.layout()
    v = np.zeros(lay["size"].stop)
    y = _labels(table, spec)
    n = len(y)
    v[0] = y.mean()
    for name in spec.numeric:
        u = _numeric(table, name) / scales[name]
        v[lay[f"{name}:moments"]] = [u.mean(), (u * u).mean(), (u * y).mean()]
        cell = fine_cell(u, spec.grid)
        hist = np.zeros((spec.grid, 2))
        np.add.at(hist, (cell, y.astype(np.int64)), 1.0)
        v[lay[f"{name}:hist"]] = hist.reshape(-1) / n
    for name, levels in spec.categorical.items():
        index = {lv: i for i, lv in enumerate(levels)}
        code = np.array([index.get(s, len(levels)) for s in table[name]], dtype=np.int64)
        counts = np.zeros((len(levels) + 1, 2))
        np.add.at(counts, (code, y.astype(np.int64)), 1.0)
        v[lay[f"{name}:counts"]] = counts.reshape(-1) / n
    return v


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class VariableStats:
    """Selection statistics of one input column.

    Attributes:
        name: column.
        kind: ``"numeric"`` or ``"categorical"``.
        iv: information value over its bins.
        bins: bin labels (numeric: ``"[lo, hi)"`` in original units; categorical: levels).
        woe: weight of evidence per bin, ``ln(share of non-events / share of events)``.
        counts: per bin ``(non-events, events)``.
        mean, var: numeric only (population variance).
        corr: Pearson correlation with the 0/1 target (numeric only).
    """

    name: str
    kind: str
    iv: float
    bins: tuple[str, ...]
    woe: tuple[float, ...]
    counts: tuple[tuple[int, int], ...]
    mean: float | None = None
    var: float | None = None
    corr: float | None = None


@dataclass(frozen=True)
class FederatedStats:
    """Pooled statistics, and which parties contributed."""

    n: int
    positive_rate: float
    variables: Mapping[str, VariableStats]
    contributors: tuple[Hashable, ...] = ()
    rejected: Mapping[Hashable, str] = field(default_factory=dict)

    def iv(self) -> dict[str, float]:
        return {k: v.iv for k, v in self.variables.items()}


def woe_iv(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """WoE per bin and IV from ``counts[bin] = (non-events, events)``; 0.5 added to empty
    cells so that every WoE is finite."""
    c = np.asarray(counts, np.float64) + 0.5 * (np.asarray(counts) == 0)
    good = c[:, 0] / c[:, 0].sum()
    bad = c[:, 1] / c[:, 1].sum()
    woe = np.log(good / bad)
    return woe, float(((good - bad) * woe).sum())


def merge_cells(hist: np.ndarray, bins: int) -> list[tuple[int, int]]:
    """Cut consecutive non-empty fine cells into up to ``bins`` groups of about equal
    population; returns ``[(first cell, last cell + 1)]``."""
    total = hist.sum()
    target = total / bins
    groups: list[tuple[int, int]] = []
    start: int | None = None
    acc = 0.0
    for i, h in enumerate(hist.sum(axis=1)):
        if h == 0:
            continue
        if start is None:
            start = i
        acc += h
        if acc >= target * (len(groups) + 1) - 1e-9 and len(groups) < bins - 1:
            groups.append((start, i + 1))
            start = None
    if start is not None:
        groups.append((start, len(hist)))
    return groups


def _cell_edge(cell: int, grid: int, scale: float) -> float:
    t = 2.0 * cell / grid - 1.0
    u = np.sign(t) * np.expm1(abs(t) * math.log1p(_LOG_K)) / _LOG_K
    return float(u * scale)


def _numeric_stats(name: str, spec: VariableSpec, scale: float, moments: np.ndarray,
                   hist: np.ndarray, ybar: float) -> VariableStats:
    mu, m2, my = moments
    var_u = max(m2 - mu * mu, 0.0)
    var_y = ybar * (1 - ybar)
    corr = (my - mu * ybar) / math.sqrt(var_u * var_y) if var_u > 0 and var_y > 0 else 0.0
    groups = merge_cells(hist, spec.bins)
    counts = np.array([hist[a:b].sum(axis=0) for a, b in groups])
    woe, iv = woe_iv(counts)
    labels = tuple(f"[{_cell_edge(a, spec.grid, scale):.6g}, {_cell_edge(b, spec.grid, scale):.6g})"
                   for a, b in groups)
    return VariableStats(name, "numeric", iv, labels, tuple(woe.tolist()),
                         tuple((int(g), int(b)) for g, b in counts), mean=float(mu * scale),
                         var=float(var_u * scale * scale), corr=float(corr))


def _categorical_stats(name: str, levels: tuple[str, ...], counts: np.ndarray
                       ) -> VariableStats:
    keep = counts.sum(axis=1) > 0
    labels = tuple(lv for lv, k in zip((*levels, "<other>"), keep, strict=True) if k)
    woe, iv = woe_iv(counts[keep])
    return VariableStats(name, "categorical", iv, labels, tuple(woe.tolist()),
                         tuple((int(g), int(b)) for g, b in counts[keep]))


def finish(spec: VariableSpec, scales: Mapping[str, float], mean_vector: np.ndarray,
           n: float, contributors: tuple = (), rejected: Mapping | None = None
           ) -> FederatedStats:
    """Key holder: pooled per-row means (and the pooled row count) -> selection statistics."""
    lay = spec.layout()
    n_int = int(round(n))
    v = np.asarray(mean_vector, np.float64)
    ybar = float(v[0])
    out: dict[str, VariableStats] = {}
    for name in spec.numeric:
        hist = np.rint(v[lay[f"{name}:hist"]] * n).reshape(spec.grid, 2)
        out[name] = _numeric_stats(name, spec, scales[name], v[lay[f"{name}:moments"]],
                                   np.maximum(hist, 0), ybar)
    for name, levels in spec.categorical.items():
        counts = np.maximum(np.rint(v[lay[f"{name}:counts"]] * n), 0).reshape(-1, 2)
        out[name] = _categorical_stats(name, levels, counts)
    return FederatedStats(n_int, ybar, out, contributors, dict(rejected or {}))


# --------------------------------------------------------------------------- protocols


def _secure_mean(
    vectors: Mapping[Hashable, tuple[np.ndarray, float]],
    make_aggregator: Callable[[int], Aggregator],
    size: int,
) -> tuple[np.ndarray, float, tuple, dict]:
    """Encode each party's (vector, weight), sum on the server, decode the pooled mean."""
    agg = make_aggregator(size)
    payloads = {cid: agg.encode(cid, v, w) for cid, (v, w) in vectors.items() if w > 0}
    total = agg.aggregate(payloads)
    mean, weight = agg.decode(total)
    return np.asarray(mean), float(weight), total.contributors, dict(total.rejected)


def scales_from(spec: VariableSpec, fractions: np.ndarray, n: float) -> dict[str, float]:
    """Smallest power of ten bounding every ``|x|`` of each numeric feature."""
    out = {}
    for i, name in enumerate(spec.numeric):
        f = fractions[i * DECADES : (i + 1) * DECADES]
        ok = np.flatnonzero(f * n >= n - 0.5)
        if len(ok) == 0:
            raise DataError(f"column {name!r} has values beyond 1e18; rescale it first")
        out[name] = float(10.0 ** ok[0])
    return out


def federated_stats(
    parties: Mapping[Hashable, Table],
    spec: VariableSpec,
    make_aggregator: Callable[[int], Aggregator] = PlainAggregator,
) -> FederatedStats:
    """Selection statistics over all parties' rows, only aggregates ever decoded.

    Args:
        parties: party id -> its rows (including the target column).
        spec: the public plan.
        make_aggregator: vector size -> a fresh Aggregator (plain, or encrypted).

    Raises:
        RoundError: no party contributed.
        DataError: a party's data does not follow the plan.

    Example:
        >>> rows = {"a": [["20", "red", "no"], ["30", "blue", "yes"]],
        ...         "b": [["40", "red", "no"], ["50", "blue", "yes"], ["60", "red", "yes"]]}
        >>> parties = {k: Table.from_rows(["age", "color", "y"], v) for k, v in rows.items()}
        >>> spec = VariableSpec("y", "yes", ("age",), {"color": ("blue", "red")})
        >>> st = federated_stats(parties, spec)   # PlainAggregator; pass a CKKS one to encrypt
        >>> st.n, round(st.variables["age"].mean, 6), st.variables["color"].counts
        (5, 40.0, ((0, 2), (2, 1)))
    """
    if not parties:
        raise ConfigError("no parties given")
    parties = {cid: t for cid, t in parties.items() if len(t) > 0}  # empty: weight 0
    if not parties:
        raise RoundError("no party has any rows; nothing to compute statistics over")
    sizes = {cid: float(len(t)) for cid, t in parties.items()}
    scale_size = DECADES * len(spec.numeric)
    scales: dict[str, float] = {}
    if scale_size:
        frac, n, _, rej = _secure_mean(
            {cid: (scale_vector(t, spec), sizes[cid]) for cid, t in parties.items()},
            make_aggregator, scale_size)
        scales = scales_from(spec, frac, n)
    size = spec.layout()["size"].stop
    mean, n, contributors, rejected = _secure_mean(
        {cid: (stats_vector(t, spec, scales), sizes[cid]) for cid, t in parties.items()},
        make_aggregator, size)
    if not contributors:
        raise RoundError(f"no party contributed statistics (rejected: {rejected})")
    return finish(spec, scales, mean, n, contributors, rejected)


def pooled_stats(table: Table, spec: VariableSpec) -> FederatedStats:
    """The plaintext reference: the same statistics computed directly on pooled rows."""
    y = _labels(table, spec)
    n = len(y)
    ybar = float(y.mean())
    out: dict[str, VariableStats] = {}
    for name in spec.numeric:
        x = _numeric(table, name)
        scale = float(10.0 ** np.flatnonzero(np.abs(x).max() <= 10.0 ** np.arange(DECADES))[0])
        u = x / scale
        hist = np.zeros((spec.grid, 2))
        np.add.at(hist, (fine_cell(u, spec.grid), y.astype(np.int64)), 1.0)
        moments = np.array([u.mean(), (u * u).mean(), (u * y).mean()])
        out[name] = _numeric_stats(name, spec, scale, moments, hist, ybar)
    for name, levels in spec.categorical.items():
        index = {lv: i for i, lv in enumerate(levels)}
        code = np.array([index.get(s, len(levels)) for s in table[name]], dtype=np.int64)
        counts = np.zeros((len(levels) + 1, 2))
        np.add.at(counts, (code, y.astype(np.int64)), 1.0)
        out[name] = _categorical_stats(name, levels, counts)
    return FederatedStats(n, ybar, out)


def select_variables(stats: FederatedStats, min_iv: float = 0.02,
                     max_iv: float = math.inf) -> tuple[str, ...]:
    """Columns whose IV is in ``[min_iv, max_iv)``, strongest first (IV > 0.5 is often
    treated as suspiciously strong: a leak of the label)."""
    chosen = [(v.iv, k) for k, v in stats.variables.items() if min_iv <= v.iv < max_iv]
    return tuple(k for _, k in sorted(chosen, key=lambda t: (-t[0], t[1])))


# ------------------------------------------------------------------ preprocessing, federated


def preprocessor_from_stats(stats: FederatedStats, selected: Sequence[str], target: str,
                            positive: str, sep: str | None = None) -> Preprocessor:
    """One-hot the selected categoricals (levels seen in the pooled counts) and standardise the
    selected numerics with the securely computed pooled mean and standard deviation."""
    cols = []
    for name in selected:
        v = stats.variables[name]
        if v.kind == "numeric":
            assert v.mean is not None and v.var is not None
            cols.append(Column(name, "numeric", mean=v.mean, std=math.sqrt(v.var) or 1.0))
        else:
            cols.append(Column(name, "categorical",
                               categories=tuple(b for b in v.bins if b != "<other>")))
    return Preprocessor(target, positive, tuple(cols), sep)


def schema_of(parties: Mapping[Hashable, Table], target: str, positive: str | None = None
              ) -> VariableSpec:
    """The data dictionary of parties holding the same columns: a column is numeric if every
    party's values parse as numbers; a text column's levels are the union of the parties'
    level sets. Each party computes its part locally; no row leaves it.

    Raises:
        DataError: the parties' columns differ, the target is not binary, or a text column has
            missing values.
    """
    tables = [t for t in parties.values() if len(t)]
    if not tables:
        raise DataError("no party has any rows")
    names = tables[0].names
    for cid, t in parties.items():
        if len(t) and set(t.names) != set(names):
            raise DataError(f"party {cid!r} has columns {sorted(t.names)}, the others "
                            f"{sorted(names)}; every party needs the same columns")
    tables[0].target(target)  # every party has the same columns: one check is every party's
    labels = np.concatenate([np.unique(t[target]) for t in tables])
    positive = positive if positive is not None else default_positive(np.unique(labels))
    if positive not in set(labels):
        raise DataError(f"positive label {positive!r} does not occur in column {target!r}")
    numeric, categorical = [], {}
    for name in names:
        if name == target:
            continue
        if all(as_float(t[name]) is not None for t in tables):
            numeric.append(name)
            continue
        for t in tables:
            check_text_complete(name, t[name])
        categorical[name] = tuple(sorted({str(v) for t in tables for v in np.unique(t[name])}))
    return VariableSpec(target, str(positive), tuple(numeric), categorical)


def fit_preprocessing(
    parties: Mapping[Hashable, Table],
    target: str,
    positive: str | None = None,
    make_aggregator: Callable[[int], Aggregator] = PlainAggregator,
) -> Preprocessor:
    """The preprocessing a federation trains with, fitted without pooling rows: column kinds
    and levels from ``schema_of``; numeric means and standard deviations from four secure
    means of per-row values (through ``make_aggregator``: plaintext, or CKKS so that no party's
    statistics are seen), every entry in [-1, 1]:

    1. per column, the fraction of rows with ``|x| <= 10^k`` (k = 0..18): a power-of-ten bound
       ``s`` on ``|x|`` (as in ``federated_stats``);
    2. per column, ``mean(x / s)``: the pooled mean;
    3. per column, the fraction of rows with ``|x - mean| <= 10^k``, above the mean and below
       it: a bound ``d`` on the deviations, and whether the column is constant (every row on one
       side of the mean as computed: robust to the mean's rounding or CKKS error; the counts are
       exact after rounding, under CKKS too);
    4. per column, ``mean(((x - mean) / d)^2)``: a centred second moment, so a column whose
       spread is small next to its magnitude (timestamps) loses nothing to the cancellation of
       ``E[x^2] - E[x]^2``.

    A constant column gets std 1 (its standardised value is 0 for every training row). Equal to
    ``Preprocessor.fit`` on the pooled rows, up to float rounding (and CKKS's error when
    encrypted).

    Example:
        >>> rows = {"a": [["20", "red", "no"], ["30", "blue", "yes"]],
        ...         "b": [["40", "red", "no"], ["50", "blue", "yes"], ["60", "red", "yes"]]}
        >>> parties = {k: Table.from_rows(["age", "color", "y"], v) for k, v in rows.items()}
        >>> pre = fit_preprocessing(parties, "y")
        >>> pre.feature_names, round(pre.columns[0].mean, 9), pre.positive
        (('age', 'color=blue', 'color=red'), 40.0, 'yes')
    """
    spec = schema_of(parties, target, positive)
    tables = {cid: t for cid, t in parties.items() if len(t)}
    names = spec.numeric
    values = {cid: {n: _numeric(t, n) for n in names} for cid, t in tables.items()}  # parsed once
    sizes = {cid: float(len(t)) for cid, t in tables.items()}
    thresholds = 10.0 ** np.arange(DECADES)

    def pooled(per_party: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]], size: int
               ) -> tuple[np.ndarray, float]:
        vectors = {cid: (np.concatenate(per_party(v)) if names else np.zeros(0), sizes[cid])
                   for cid, v in values.items()}
        mean, n, _, _ = _secure_mean(vectors, make_aggregator, size)
        return mean, n

    def bounded(a: np.ndarray) -> np.ndarray:
        return (np.abs(a)[:, None] <= thresholds[None, :]).mean(axis=0)

    means: dict[str, float] = {}
    stds: dict[str, float] = {}
    if names:
        frac, n = pooled(lambda v: [bounded(v[c]) for c in names], DECADES * len(names))
        scales = scales_from(spec, frac, n)
        mu, _ = pooled(lambda v: [np.array([(v[c] / scales[c]).mean()]) for c in names],
                       len(names))
        means = {c: float(m * scales[c]) for c, m in zip(names, mu, strict=True)}
        width = DECADES + 2
        frac, n = pooled(lambda v: [np.concatenate([bounded(v[c] - means[c]),
                                                    [(v[c] > means[c]).mean(),
                                                     (v[c] < means[c]).mean()]])
                                    for c in names], width * len(names))
        bounds = {}
        for i, c in enumerate(names):
            f = frac[i * width : (i + 1) * width]
            if min(round(f[DECADES] * n), round(f[DECADES + 1] * n)) == 0:
                stds[c] = 1.0  # constant
                continue
            ok = np.flatnonzero(f[:DECADES] * n >= n - 0.5)
            if len(ok) == 0:
                raise DataError(f"column {c!r} has values beyond 1e18; rescale it first")
            bounds[c] = float(10.0 ** ok[0])
        spread = [c for c in names if c in bounds]
        if spread:
            m2, _ = pooled(lambda v: [np.array([(((v[c] - means[c]) / bounds[c]) ** 2).mean()
                                                for c in spread])], len(spread))
            for c, v2 in zip(spread, m2, strict=True):
                stds[c] = bounds[c] * math.sqrt(max(float(v2), 0.0)) or 1.0
    seps = {t.sep for t in parties.values()}
    columns = [c for c in next(iter(parties.values())).names if c != target]
    return Preprocessor(target, spec.positive, tuple(
        Column(c, "numeric", mean=means[c], std=stds[c]) if c in means
        else Column(c, "categorical", categories=spec.categorical[c]) for c in columns),
        seps.pop() if len(seps) == 1 else None)
