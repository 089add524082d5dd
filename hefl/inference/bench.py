"""``hefl infer bench``: logistic regression on any CSV, scored under encryption.

Stratified 80/20 split (seed 0), preprocessing fitted on the training rows only (one-hot
categoricals, standardised numerics), scikit-learn ``LogisticRegression``, then the test rows are
scored both in plaintext and encrypted (the full data-owner + model-owner path, in process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hefl.data.tabular import Preprocessor, Table, default_positive, stratified_split
from hefl.inference.engine import score_encrypted
from hefl.inference.model import LinearModel, ModelFile

#: Exactly the keys ``bench --json`` prints.
BENCH_KEYS = (
    "rows", "features", "accuracy_plain", "accuracy_encrypted", "auc_plain", "auc_encrypted",
    "us_per_record", "server_us_per_record", "ciphertext_bytes_per_record", "workers",
)


def fit_logistic(train: Table, target: str, positive: str | None = None) -> ModelFile:
    """Preprocessing + scikit-learn logistic regression fitted on ``train``."""
    from sklearn.linear_model import LogisticRegression

    pre = Preprocessor.fit(train, target=target, positive=positive)
    est = LogisticRegression(max_iter=2000).fit(pre.transform(train), pre.labels(train))
    return ModelFile(LinearModel.from_sklearn(est), pre)


def auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def bench_table(table: Table, target: str, positive: str | None = None, seed: int = 0,
                save_model: str | Path | None = None, profile: str = "precise",
                workers: int = 1) -> dict:
    """Train on 80 %, score the 20 % test split in plaintext and encrypted (``workers``
    processes per side, see ``score_encrypted``); the JSON figures."""
    positive = positive or default_positive(table.target(target))
    tr, te = stratified_split((table[target] == positive).astype(int), 0.2, seed)
    mf = fit_logistic(table.take(tr), target, positive)
    if save_model:
        mf.save(save_model)
    test = table.take(te)
    x, y = mf.preprocessing.transform(test), mf.preprocessing.labels(test)  # type: ignore[union-attr]
    plain = mf.model.logits(x)
    enc, t = score_encrypted(mf.model, x, profile=profile, workers=workers)
    return {
        "rows": len(table),
        "features": mf.model.n_features,
        "accuracy_plain": float(((plain > 0) == y).mean()),
        "accuracy_encrypted": float(((enc > 0) == y).mean()),
        "auc_plain": auc(y, plain),
        "auc_encrypted": auc(y, enc),
        "us_per_record": t.us_per_record,
        "server_us_per_record": t.server_us_per_record,
        "ciphertext_bytes_per_record": t.bytes_per_record,
        "workers": workers,
    }
