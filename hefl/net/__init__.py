"""Deployment: a hefl server and its clients talking gRPC (TLS, tokens, chunked streams).

    hefl certs  --out certs --clients alice,bob,carol     # CA, server/client certs, tokens
    hefl server --config run.toml                         # runs the rounds, state in SQLite
    hefl client --server HOST:PORT --data alice.npz --token-file certs/clients/alice.token \\
                --ca certs/ca.pem

The round is the same computation as ``hefl.simulation.run`` (the ``hefl.rounds`` steps over the
roles of ``hefl.roles``): ``coordinator`` runs it with no transport, ``grpc_service`` serves it
over gRPC, ``memory`` in-process for tests.
"""

import os as _os

# gRPC's C core logs every failed TLS handshake (a port scanner, a client without TLS) at INFO
# on stderr, between hefl's JSON log lines; hefl logs what matters itself. ERROR and above still
# print. Set GRPC_VERBOSITY yourself to see more: this only fills in a default, and it must be
# set before grpc starts, which is why it lives here (every grpc user in hefl is under hefl.net).
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
