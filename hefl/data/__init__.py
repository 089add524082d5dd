"""Federated data: containers, partitioners and loaders."""

from hefl.data.federated import ClientData, FederatedData
from hefl.data.loaders import Pooled, load_digits, load_femnist, load_shakespeare
from hefl.data.partition import by_key, dirichlet, iid

__all__ = [
    "ClientData",
    "FederatedData",
    "Pooled",
    "by_key",
    "dirichlet",
    "iid",
    "load_digits",
    "load_femnist",
    "load_shakespeare",
]
