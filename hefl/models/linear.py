"""Logistic regression in numpy: the scikit-learn-compatible linear model adapter.

Binary problems use one logit (``sigmoid(x @ w + b)``); more classes use softmax. Parameters are
``{"coef": (k, d), "intercept": (k,)}`` exactly like scikit-learn's ``LogisticRegression``, so a
trained model converts both ways (``from_sklearn`` / ``to_sklearn``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hefl.client import FitConfig
from hefl.data.federated import ClientData
from hefl.params import ParamSpec


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class LogisticRegressionModel:
    """Adapter with the same interface as ``TorchModel`` (spec, init_vector, fit, evaluate).

    Args:
        n_features: input dimension.
        n_classes: number of classes (2 -> one logit).
        l2: L2 penalty added to the local loss.

    Example:
        >>> m = LogisticRegressionModel(n_features=3, n_classes=2)
        >>> m.spec.size
        4
    """

    def __init__(self, n_features: int, n_classes: int = 2, l2: float = 0.0) -> None:
        self.n_features = n_features
        self.n_classes = n_classes
        self.k = 1 if n_classes == 2 else n_classes
        self.l2 = l2
        self.spec = ParamSpec(
            names=("coef", "intercept"),
            shapes=((self.k, n_features), (self.k,)),
            dtypes=("float64", "float64"),
        )

    def init_vector(self) -> np.ndarray:
        return np.zeros(self.spec.size)

    def _split(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.spec.unflatten(vector)
        return p["coef"], p["intercept"]

    def decision_function(self, vector: np.ndarray, x: np.ndarray) -> np.ndarray:
        w, b = self._split(vector)
        z = np.asarray(x, np.float64) @ w.T + b
        return z[:, 0] if self.k == 1 else z

    def predict_proba(self, vector: np.ndarray, x: np.ndarray) -> np.ndarray:
        z = self.decision_function(vector, x)
        if self.k == 1:
            p = _sigmoid(z)
            return np.stack([1 - p, p], axis=1)
        return _softmax(z)

    def _grad(self, w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
        z = x @ w.T + b
        if self.k == 1:
            p = _sigmoid(z[:, 0])
            err = (p - y)[:, None]
            loss = -np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))
        else:
            p = _softmax(z)
            onehot = np.eye(self.k)[y]
            err = p - onehot
            loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
        gw = err.T @ x / len(y) + self.l2 * w
        gb = err.mean(axis=0)
        return gw, gb, float(loss)

    def fit(
        self, vector: np.ndarray, data: ClientData, config: FitConfig
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Minibatch SGD over the client's data, shuffled with ``default_rng(config.seed)``."""
        w, b = (a.copy() for a in self._split(vector))
        w0, b0 = w.copy(), b.copy()
        x = np.asarray(data.x, np.float64)
        y = np.asarray(data.y).astype(np.int64)
        rng = np.random.default_rng(config.seed)
        losses = []
        for _ in range(config.epochs):
            perm = rng.permutation(len(y))
            for s in range(0, len(y), config.batch_size):
                idx = perm[s : s + config.batch_size]
                gw, gb, loss = self._grad(w, b, x[idx], y[idx])
                if config.prox_mu > 0:
                    gw += config.prox_mu * (w - w0)
                    gb += config.prox_mu * (b - b0)
                w -= config.lr * gw
                b -= config.lr * gb
                losses.append(loss)
        return self.spec.flatten({"coef": w, "intercept": b}), {
            "loss": float(np.mean(losses)) if losses else 0.0
        }

    def evaluate(self, vector: np.ndarray, data: ClientData) -> dict[str, float]:
        p = self.predict_proba(vector, data.x)
        y = np.asarray(data.y).astype(np.int64)
        loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)) if len(y) else 0.0
        acc = float((p.argmax(1) == y).mean()) if len(y) else 0.0
        return {"loss": float(loss), "accuracy": acc, "n": len(y)}

    @classmethod
    def from_sklearn(cls, est: Any) -> tuple[LogisticRegressionModel, np.ndarray]:
        """A fitted sklearn ``LogisticRegression``/``SGDClassifier`` -> (adapter, vector)."""
        coef = np.asarray(est.coef_, np.float64)
        model = cls(coef.shape[1], max(len(est.classes_), 2))
        return model, model.spec.flatten(
            {"coef": coef, "intercept": np.asarray(est.intercept_, np.float64)}
        )

    def to_sklearn(self, vector: np.ndarray) -> Any:
        """A scikit-learn ``LogisticRegression`` carrying these parameters (for predict)."""
        from sklearn.linear_model import LogisticRegression

        w, b = self._split(vector)
        est = LogisticRegression()
        est.coef_, est.intercept_ = w.copy(), b.copy()
        est.classes_ = np.arange(self.n_classes)
        return est
