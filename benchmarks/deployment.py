"""W1 config a (../shared/bench/WORKLOADS.md) deployed over loopback gRPC vs in-process simulation.

gRPC: a ``hefl server`` process and 10 ``hefl client`` processes on 127.0.0.1 with TLS on
(certificates from ``hefl certs``), exactly as a user runs them. In-process: ``hefl.simulate`` in
one fresh process. Both run the same rounds (same seed, split, model), so the final accuracy
matches.

    python benchmarks/deployment.py                      # table: both transports, medians of 3
    python benchmarks/deployment.py --json               # one JSON object (gRPC figures)
    python benchmarks/deployment.py --json --transport inproc --repeat 1
    python benchmarks/deployment.py --he bfv             # encrypted aggregation (BFV)

JSON keys: transport, he, rounds, wall_s, s_per_round, bytes_sent_per_client_round.
``wall_s``: whole run as a user sees it (process start to exit; for gRPC the server's lifetime,
including client start-up). ``s_per_round``: steady-state round time (gRPC: first round start to
last round end in the server log, over rounds; in-process: the round loop over rounds).
``bytes_sent_per_client_round``: encoded update body a client uploads per round (excludes
gRPC/TLS framing, a few hundred bytes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _ts(e: dict) -> float:
    return dt.datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def run_grpc(config: str, he: str) -> dict:
    from hefl.net.store import Store
    from hefl.net.testing import events, make_demo, spawn_client, spawn_key_holder, spawn_server
    from hefl.workloads import w1

    wl = w1(config)
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo(
            Path(tmp), wl.data, model={"kind": "mlp", "seed": 0}, rounds=wl.rounds,
            clients_per_round=wl.clients_per_round, test=wl.test,
            algorithm={"name": "fedavg", "client_lr": wl.client_lr, "batch_size": wl.batch_size},
            server={"min_clients": wl.clients_per_round},
            aggregation=None if he == "none" else {"kind": he, "custody": "clients"},
            key_holders=() if he == "none" else ("kh",),
        )
        share = demo.root / "keys" / "share.key"
        extra = [] if he == "none" else ["--he-key", str(share)]
        t0 = time.perf_counter()
        server = spawn_server(demo)
        clients = [spawn_client(demo, n, *extra) for n in demo.names]
        if he != "none":  # the registered key holder verifies and decrypts each round's sum
            clients.append(spawn_key_holder(demo, "kh", share))
        rc = [p.wait(900) for p in [server, *clients]]
        wall = time.perf_counter() - t0
        if any(rc):
            raise SystemExit(f"gRPC run failed (exit codes {rc}); see {demo.root}")
        log = demo.state / "server.log"
        start = _ts(events(log, "round_started")[0])
        end = _ts(events(log, "round_completed")[-1])
        s = Store(demo.state, readonly=True)
        records = s.records(s.runs()[0].run_id)
        s.close()
    return {
        "transport": "grpc", "he": he, "rounds": len(records), "wall_s": wall,
        "s_per_round": (end - start) / len(records),
        "bytes_sent_per_client_round": statistics.mean(
            r.upload_bytes / r.contributors for r in records),
        "final_accuracy": records[-1].metrics["test_accuracy"],
    }


def child_inproc(config: str, he: str) -> dict:
    import hefl
    from hefl import workloads

    workloads.set_torch_threads(1)
    wl = workloads.w1(config)
    algo = hefl.fedavg(client_lr=wl.client_lr, batch_size=wl.batch_size)
    aggregator = None
    if he != "none":
        from hefl.crypto import make_aggregator

        aggregator = make_aggregator(he, wl.model.spec.size, custody="clients")
    t0 = time.perf_counter()
    res = hefl.simulate(wl.model, wl.data, algo, rounds=wl.rounds, aggregator=aggregator,
                        clients_per_round=wl.clients_per_round, seed=0, test=wl.test)
    loop = time.perf_counter() - t0
    recs = res.history.records
    return {
        "s_per_round": loop / wl.rounds, "rounds": len(recs),
        "bytes_sent_per_client_round": statistics.mean(
            r.upload_bytes / r.contributors for r in recs),
        "final_accuracy": recs[-1].metrics["test_accuracy"],
    }


def run_inproc(config: str, he: str) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--child", "--config", config, "--he", he],
                       capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"in-process run failed:\n{p.stderr}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {"transport": "inproc", "he": he, "rounds": out["rounds"], "wall_s": wall,
            "s_per_round": out["s_per_round"],
            "bytes_sent_per_client_round": out["bytes_sent_per_client_round"],
            "final_accuracy": out["final_accuracy"]}


KEYS = ("transport", "he", "rounds", "wall_s", "s_per_round", "bytes_sent_per_client_round")


def median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k in ("wall_s", "s_per_round", "bytes_sent_per_client_round", "final_accuracy"):
        out[k] = statistics.median(r[k] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="a", choices=["a", "b", "c"])
    ap.add_argument("--transport", default=None, choices=["grpc", "inproc"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--he", default="none", choices=["none", "bfv"],
                    help="encrypted aggregation (custody 'clients' + a key holder); CKKS is "
                    "refused in deployment until noise flooding lands")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_inproc(a.config, a.he)))
        return
    transports = [a.transport] if a.transport else (["grpc"] if a.json else ["inproc", "grpc"])
    runs: dict[str, list[dict]] = {t: [] for t in transports}
    for _ in range(a.repeat):  # alternate transports so load drifts hit both
        for t in transports:
            runs[t].append(run_grpc(a.config, a.he) if t == "grpc" else run_inproc(a.config, a.he))
    med = {t: median_of(r) for t, r in runs.items()}
    if a.json:
        print(json.dumps({k: med[transports[0]][k] for k in KEYS}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"W1 config {a.config}: medians of {a.repeat} runs")
    for col in (*KEYS, "final_accuracy"):
        table.add_column(col)
    for t in transports:
        m = med[t]
        table.add_row(m["transport"], m["he"], str(m["rounds"]), f"{m['wall_s']:.2f}",
                      f"{m['s_per_round']:.4f}", f"{m['bytes_sent_per_client_round']:.0f}",
                      f"{m['final_accuracy']:.4f}")
    Console().print(table)
    if len(transports) == 2:
        g, i = med["grpc"], med["inproc"]
        print(f"gRPC / in-process: wall {g['wall_s'] / i['wall_s']:.2f}x, "
              f"per round {g['s_per_round'] / i['s_per_round']:.2f}x")


if __name__ == "__main__":
    main()
