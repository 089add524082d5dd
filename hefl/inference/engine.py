"""Encrypted batch scoring without a network: the steps both sides run, in one place.

    data owner:  keyring = new_keyring(model)         # secret key stays here
                 blobs   = keyring.encrypt_batch(x)    # one ciphertext per feature
    model owner: result  = evaluate(Evaluator(keyring.evaluation_keys()), model, blobs)
    data owner:  logits  = keyring.decrypt_scores(result, len(x))

``score_encrypted`` runs the three steps over any number of records, splitting them into batches
of ``records_per_ciphertext`` (a batch larger than the packing allows is split, never refused),
and times each side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hefl.crypto.scoring import (
    LR_FAST_PARAMS,
    LR_PARAMS,
    MLP_PARAMS,
    CkksParams,
    Evaluator,
    Keyring,
    split_batches,
)
from hefl.errors import ConfigError
from hefl.inference.model import LinearModel, Model, PolyMLP

PROFILES = ("precise", "fast")


def params_for(model: Model, profile: str = "precise") -> CkksParams:
    """CKKS parameters sized to the model's multiplicative depth.

    Args:
        profile: ``"precise"`` (default) or ``"fast"`` (logistic regression only: one data prime,
            ~40 % cheaper, logits limited to +-128).
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown parameter profile {profile!r}; choose one of {PROFILES}")
    if isinstance(model, LinearModel):
        return LR_FAST_PARAMS if profile == "fast" else LR_PARAMS
    return MLP_PARAMS


def new_keyring(model: Model, profile: str = "precise", workers: int = 1) -> Keyring:
    """A data owner's fresh keys for scoring ``model`` (relinearization keys for the MLP);
    ``workers > 1`` shares encryption with ``workers - 1`` helper processes."""
    return Keyring.generate(params_for(model, profile), relin=isinstance(model, PolyMLP),
                            workers=workers)


def evaluate(evaluator: Evaluator, model: Model, blobs: Sequence[bytes],
             records: int | None = None) -> bytes:
    """Model owner: the encrypted logits of one batch of ``records`` records (serialized result
    ciphertext); ``records`` fixes a linear model's packing (``Evaluator.linear``)."""
    if isinstance(model, LinearModel):
        return evaluator.linear(blobs, model.coef, model.intercept, records)
    return evaluator.poly_mlp(blobs, model.w1, model.b1, model.activation, model.w2, model.b2)


def blocks_for(keyring: Keyring, model: Model, records: int) -> int:
    """Features per ciphertext for a batch of ``records`` records of ``model``: several for a
    linear model's partly filled batch (``Keyring.blocks_for``), else 1."""
    if isinstance(model, LinearModel):
        return keyring.blocks_for(records, model.n_features)
    return 1


@dataclass
class Timing:
    """Seconds and bytes spent scoring ``records`` records."""

    records: int = 0
    client_s: float = 0.0
    server_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    setup_s: float = 0.0

    @property
    def us_per_record(self) -> float:
        return 1e6 * (self.client_s + self.server_s) / max(self.records, 1)

    @property
    def us_per_record_with_setup(self) -> float:
        """``us_per_record`` with the helper processes' start-up spread over these records."""
        return 1e6 * (self.client_s + self.server_s + self.setup_s) / max(self.records, 1)

    @property
    def server_us_per_record(self) -> float:
        return 1e6 * self.server_s / max(self.records, 1)

    @property
    def cpu_us_per_record(self) -> float:
        """CPU time of this process per record (helper processes' CPU is not included)."""
        return 1e6 * (self.client_cpu_s + self.server_cpu_s) / max(self.records, 1)

    @property
    def server_cpu_us_per_record(self) -> float:
        return 1e6 * self.server_cpu_s / max(self.records, 1)

    @property
    def bytes_per_record(self) -> float:
        return (self.bytes_up + self.bytes_down) / max(self.records, 1)


def score_encrypted(
    model: Model,
    x: np.ndarray,
    keyring: Keyring | None = None,
    batch_size: int | None = None,
    on_batch: Callable[[slice, np.ndarray], None] | None = None,
    profile: str = "precise",
    workers: int = 1,
    seeded: bool = True,
) -> tuple[np.ndarray, Timing]:
    """Encrypted logits of every row of ``x``, and the time each side spent.

    Args:
        model: a ``LinearModel`` or ``PolyMLP``.
        x: preprocessed records (rows x features).
        keyring: the data owner's keys (fresh ones by default).
        batch_size: records per batch (default and maximum: one full ciphertext).
        on_batch: called with each batch's row slice and logits as soon as it is decrypted.
        profile: parameter profile when no keyring is given (see ``params_for``).
        workers: processes per side (data owner and model owner each), this one included;
            helpers are started once here and stopped on return. ``Timing.setup_s`` is the
            wall time of making the keys (unless given) and starting the helpers. A given
            ``keyring`` keeps its own helpers.
        seeded: seeded ciphertexts (half the upload) or full ones (cheaper to make and load);
            see ``Keyring.encrypt_batch``.

    Example:
        >>> import numpy as np
        >>> from hefl.inference.model import LinearModel
        >>> model = LinearModel(np.array([1.0, -2.0]), 0.5)
        >>> x = np.array([[1.0, 1.0], [0.0, -1.0], [2.0, 0.25]])
        >>> logits, timing = score_encrypted(model, x)
        >>> np.round(logits, 5).tolist(), timing.records
        ([-0.5, 2.5, 2.0], 3)
    """
    t0 = time.perf_counter()
    own = keyring is None
    keyring = keyring or new_keyring(model, profile, workers)
    evaluator = Evaluator(keyring.evaluation_keys(), workers=workers)
    try:
        evaluator.startup_s, keyring.startup_s  # noqa: B018 - wait until both sides' helpers run
        return _score(model, x, keyring, evaluator, batch_size, on_batch, seeded,
                      setup_s=time.perf_counter() - t0)
    finally:
        evaluator.close()
        if own:
            keyring.close()


def _score(model: Model, x: np.ndarray, keyring: Keyring, evaluator: Evaluator,
           batch_size: int | None, on_batch: Callable[[slice, np.ndarray], None] | None,
           seeded: bool, setup_s: float) -> tuple[np.ndarray, Timing]:
    cap = keyring.params.records_per_ciphertext
    size = min(batch_size or cap, cap)
    out = np.empty(len(x))
    t = Timing(records=len(x), setup_s=setup_s)
    for rows in split_batches(len(x), size):
        t0, c0 = time.perf_counter(), time.process_time()
        k = blocks_for(keyring, model, rows.stop - rows.start)
        blobs = keyring.encrypt_batch(x[rows], seeded=seeded, blocks=k)
        t1, c1 = time.perf_counter(), time.process_time()
        result = evaluate(evaluator, model, blobs, rows.stop - rows.start)
        t2, c2 = time.perf_counter(), time.process_time()
        z = keyring.decrypt_scores(result, rows.stop - rows.start, k)
        t3, c3 = time.perf_counter(), time.process_time()
        t.client_s += (t1 - t0) + (t3 - t2)
        t.server_s += t2 - t1
        t.client_cpu_s += (c1 - c0) + (c3 - c2)
        t.server_cpu_s += c2 - c1
        t.bytes_up += sum(len(b) for b in blobs)
        t.bytes_down += len(result)
        out[rows] = z
        if on_batch is not None:
            on_batch(rows, z)
    return out, t
