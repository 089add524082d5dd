"""What the hardened HTTPS service costs: W5's test split scored through `hefl infer serve`'s
server (TLS, token, budget, limits) beside the same scoring in one process, same run.

    python benchmarks/inference_service.py [--data PATH] [--runs 3] [--json]

Workload W5 (``../shared/bench/WORKLOADS.md``): bank-full.csv.gz, ``duration`` dropped,
stratified 80/20 split (seed 0), logistic regression (precise profile), one process per side.
``in_process``: ``score_encrypted`` (keys, encrypt, evaluate, decrypt). ``https``: ``score_csv``
against a loopback ``ScoringServer`` (keys, one session, full batches, results written to a
CSV): the same work plus TLS, authentication, the budget ledger and CSV parsing and writing.
Medians of ``--runs``; with ``--json`` one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hefl.data.tabular import load_bank, shared_data, stratified_split
from hefl.inference.bench import fit_logistic
from hefl.inference.callers import Budget, Quotas
from hefl.inference.engine import score_encrypted
from hefl.inference.server import make_server
from hefl.inference.service import ScoringClient, ScoringService, score_csv
from hefl.net.certs import make_federation

DEFAULT = shared_data("bank_marketing", "bank-full.csv.gz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not a.data.exists():
        print(f"no data at {a.data}; pass --data bank-full.csv.gz", file=sys.stderr)
        return 2
    table = load_bank(a.data)
    y = (table["y"] == "yes").astype(int)
    train, test = stratified_split(y, seed=0)
    mf = fit_logistic(table.take(train), target="y")
    x = mf.preprocessing.transform(table.take(test))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        header = ",".join(table.names)
        rows = [",".join(str(table[c][i]) for c in table.names) for i in test]
        (d / "test.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
        fed = make_federation(d / "certs", ["bank-a"])
        quotas = Quotas(Budget(records_per_day=10**9, requests_per_minute=10**6),
                        ledger=d / "usage.jsonl")
        server = make_server(ScoringService(mf), fed.server_cert, fed.server_key, fed.registry,
                             port=0, quotas=quotas)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = ScoringClient(f"https://127.0.0.1:{server.server_address[1]}", fed.ca,
                               token_file=fed.token("bank-a"))
        local, remote, equal = [], [], True
        for r in range(a.runs):  # interleaved, so load on the box hits both alike
            t0 = time.perf_counter()
            z, _ = score_encrypted(mf.model, x)
            local.append(time.perf_counter() - t0)
            out = d / f"scores{r}.csv"
            t0 = time.perf_counter()
            score_csv(client, d / "test.csv", out, preprocessing=mf.preprocessing)
            remote.append(time.perf_counter() - t0)
            served = np.loadtxt(out, delimiter=",", skiprows=1, usecols=1)
            equal &= bool(((served > 0) == (z > 0)).all())
        server.shutdown()
        server.server_close()
    n = len(x)
    res = {
        "workload": "W5 bank, logistic regression, precise, 1 process per side",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "records": n,
        "runs": a.runs,
        "in_process_us_per_record": 1e6 * statistics.median(local) / n,
        "https_us_per_record": 1e6 * statistics.median(remote) / n,
        "ratio": statistics.median(remote) / statistics.median(local),
        "in_process_s_runs": [round(t, 3) for t in local],
        "https_s_runs": [round(t, 3) for t in remote],
        "same_decisions": equal,
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v:.2f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
