"""hefl: federated learning with homomorphically encrypted aggregation, and encrypted inference."""

from hefl.aggregation import Aggregate, Aggregator, PlainAggregator
from hefl.algorithms import (
    Algorithm,
    ClientConfig,
    ServerOptimizer,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedyogi,
    make_algorithm,
)
from hefl.backends import SequentialRunner
from hefl.client import Client, EvaluateRes, FitConfig, FitRes, ModelClient
from hefl.data.federated import ClientData, FederatedData
from hefl.errors import HeflError
from hefl.history import History
from hefl.params import ParamSpec
from hefl.privacy import DpConfig, DpPlan, dp
from hefl.simulation import SimulationResult, run, simulate

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "Aggregator",
    "Algorithm",
    "Client",
    "ClientConfig",
    "ClientData",
    "DpConfig",
    "DpPlan",
    "EvaluateRes",
    "FederatedData",
    "FitConfig",
    "FitRes",
    "HeflError",
    "History",
    "ModelClient",
    "ParamSpec",
    "PlainAggregator",
    "SequentialRunner",
    "ServerOptimizer",
    "SimulationResult",
    "dp",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
    "make_algorithm",
    "run",
    "simulate",
]
