"""W1 config b (../shared/bench/WORKLOADS.md): final test accuracy in plaintext and with BFV
aggregation in each custody mode (clients, keyholder, threshold 2 of 3), same seed, in one process.

    python benchmarks/he_accuracy_w1.py [--config b] [--json]

Prints a table (or one JSON object: custody -> {accuracy, wall_s}).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="b", choices=["a", "b", "c"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from hefl.algorithms import fedavg
    from hefl.crypto import make_aggregator
    from hefl.simulation import simulate
    from hefl.workloads import w1

    out = {}
    for custody in ("plain", "clients", "keyholder", "threshold"):
        wl = w1(a.config)
        kw = {} if custody == "plain" else {"aggregator": make_aggregator(
            "bfv", wl.model.spec.size, custody=custody, min_clients=2, seed=0)}
        t0 = time.perf_counter()
        res = simulate(wl.model, wl.data, fedavg(client_lr=wl.client_lr, batch_size=wl.batch_size),
                       rounds=wl.rounds, clients_per_round=wl.clients_per_round, seed=0, **kw)
        out[custody] = {"accuracy": float(wl.model.evaluate(res.params, wl.test)["accuracy"]),
                        "wall_s": time.perf_counter() - t0}
    if a.json:
        print(json.dumps(out))
        return
    print(f"W1 config {a.config}: final test accuracy (BFV 16-bit vs plaintext, same seed)")
    for k, v in out.items():
        delta = v["accuracy"] - out["plain"]["accuracy"]
        print(f"{k:<10} {v['accuracy']:.4f}  ({delta:+.4f} vs plain)  {v['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
