"""Deployment: a hefl server and its clients talking gRPC (TLS, tokens, chunked streams).

    hefl certs  --out certs --clients alice,bob,carol     # CA, server/client certs, tokens
    hefl server --config run.toml                         # runs the rounds, state in SQLite
    hefl client --server HOST:PORT --data alice.npz --token-file certs/clients/alice.token \\
                --ca certs/ca.pem

The round is the same computation as ``hefl.simulation.run`` (``hefl.rounds`` steps and the
``Aggregator`` seam); only how messages travel differs.
"""
