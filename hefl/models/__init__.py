"""Model adapters: local training, evaluation and flat-vector get/set."""

from hefl.models.keras import KerasModel
from hefl.models.linear import LogisticRegressionModel
from hefl.models.torch import TorchModel

__all__ = ["KerasModel", "LogisticRegressionModel", "TorchModel"]
