"""Scorable models and the model file: JSON weights + the preprocessing that goes with them.

Two model kinds can be evaluated on encrypted records:

- ``LinearModel`` — logistic regression (from scikit-learn or
  ``hefl.models.LogisticRegressionModel``); the encrypted output is the logit, the sigmoid is
  applied after decryption.
- ``PolyMLP`` — one hidden layer with the quadratic activation ``f(z) = c2 z^2 + c1 z + c0``
  (by default ``z^2/8 + z/2 + ln 2``, the second-order Taylor expansion of softplus), trained with
  that activation in PyTorch (``hefl.inference.mlp``).

A model file is one JSON document (never a pickle): ``{"format": "hefl-model/1", "kind": ...,
weights..., "preprocessing": {...}}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hefl.data.tabular import Preprocessor
from hefl.errors import ConfigError

#: Softplus Taylor expansion at 0: ln(1 + e^z) ~ ln 2 + z/2 + z^2/8.
SOFTPLUS2 = (0.125, 0.5, math.log(2.0))


@dataclass(frozen=True)
class LinearModel:
    """Binary logistic regression: ``logit = x @ coef + intercept``."""

    coef: np.ndarray
    intercept: float

    kind = "logistic"

    @property
    def n_features(self) -> int:
        return int(np.asarray(self.coef).size)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ np.asarray(self.coef, np.float64) + self.intercept

    @classmethod
    def from_sklearn(cls, est: Any) -> LinearModel:
        """A fitted binary scikit-learn ``LogisticRegression`` (or any linear classifier)."""
        coef = np.asarray(est.coef_, np.float64)
        if coef.shape[0] != 1:
            raise ConfigError(f"encrypted scoring supports binary models; this one has "
                              f"{coef.shape[0]} outputs")
        return cls(coef[0].copy(), float(np.asarray(est.intercept_).reshape(-1)[0]))

    @classmethod
    def from_hefl(cls, model: Any, vector: np.ndarray) -> LinearModel:
        """A ``hefl.models.LogisticRegressionModel`` and its flat parameter vector."""
        if getattr(model, "k", 1) != 1:
            raise ConfigError("encrypted scoring supports binary logistic regression only")
        p = model.spec.unflatten(vector)
        return cls(np.asarray(p["coef"], np.float64)[0].copy(), float(p["intercept"][0]))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "coef": self.coef.tolist(), "intercept": self.intercept}


@dataclass(frozen=True)
class PolyMLP:
    """``logit = w2 . f(w1 x + b1) + b2`` with ``f(z) = c2 z^2 + c1 z + c0``."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float
    activation: tuple[float, float, float] = SOFTPLUS2

    kind = "poly_mlp"

    @property
    def n_features(self) -> int:
        return int(np.asarray(self.w1).shape[1])

    @property
    def hidden(self) -> int:
        return int(np.asarray(self.w1).shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        c2, c1, c0 = self.activation
        z = np.asarray(x, np.float64) @ self.w1.T + self.b1
        return (c2 * z * z + c1 * z + c0) @ self.w2 + self.b2

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "w1": self.w1.tolist(),
            "b1": self.b1.tolist(),
            "w2": self.w2.tolist(),
            "b2": self.b2,
            "activation": list(self.activation),
        }


Model = LinearModel | PolyMLP


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))


@dataclass(frozen=True)
class ModelFile:
    """A scorable model plus the preprocessing its inputs need."""

    model: Model
    preprocessing: Preprocessor | None = None

    def __post_init__(self) -> None:
        pre = self.preprocessing
        if pre is not None and pre.n_features != self.model.n_features:
            raise ConfigError(
                f"preprocessing produces {pre.n_features} features but the model "
                f"takes {self.model.n_features}"
            )

    def to_dict(self) -> dict:
        d = {"format": "hefl-model/1", **self.model.to_dict()}
        if self.preprocessing is not None:
            d["preprocessing"] = self.preprocessing.to_dict()
        return d

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p

    @classmethod
    def from_dict(cls, d: dict) -> ModelFile:
        """Parse ``to_dict`` output.

        Raises:
            ConfigError: not a hefl model file, or malformed weights.
        """
        if not isinstance(d, dict) or d.get("format") != "hefl-model/1":
            raise ConfigError("not a hefl model file (expected \"format\": \"hefl-model/1\")")
        try:
            if d["kind"] == "logistic":
                model: Model = LinearModel(np.asarray(d["coef"], np.float64).reshape(-1),
                                           float(d["intercept"]))
            elif d["kind"] == "poly_mlp":
                w1 = np.asarray(d["w1"], np.float64)
                model = PolyMLP(w1.reshape(w1.shape[0], -1), np.asarray(d["b1"], np.float64),
                                np.asarray(d["w2"], np.float64).reshape(-1), float(d["b2"]),
                                tuple(float(c) for c in d["activation"]))  # type: ignore[arg-type]
            else:
                raise ConfigError(f"unknown model kind {d['kind']!r}; expected logistic or "
                                  "poly_mlp")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed model file: {e!r}") from e
        for a in _arrays(model):
            if not np.isfinite(a).all():
                raise ConfigError("model weights contain NaN/Inf; retrain the model")
        pre = d.get("preprocessing")
        return cls(model, Preprocessor.from_dict(pre) if pre is not None else None)

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"model file not found at {str(p)!r}")
        try:
            d = json.loads(p.read_text())
        except ValueError as e:
            raise ConfigError(f"{str(p)!r} is not JSON: {e}") from e
        return cls.from_dict(d)


def _arrays(model: Model) -> list[np.ndarray]:
    if isinstance(model, LinearModel):
        return [np.asarray(model.coef), np.asarray([model.intercept])]
    return [model.w1, model.b1, model.w2, np.asarray([model.b2]), np.asarray(model.activation)]
