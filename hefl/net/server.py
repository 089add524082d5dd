"""The federation server ``hefl server`` runs: ``hefl.net.coordinator.Coordinator`` (the round
state machine, no transport) served by ``hefl.net.grpc_service`` (gRPC + TLS)."""

from hefl.errors import Refused
from hefl.net.coordinator import Coordinator, NoKeyHolder
from hefl.net.grpc_service import FederationServer

__all__ = ["Coordinator", "FederationServer", "NoKeyHolder", "Refused"]
