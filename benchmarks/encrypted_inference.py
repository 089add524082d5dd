"""W5: encrypted batch inference on UCI Bank Marketing (logistic regression and a polynomial MLP).

    python benchmarks/encrypted_inference.py [--data PATH] [--runs 3] [--hidden 16]
        [--workers N] [--repeat K] [--full-ciphertexts] [--json]

Workload W5 (``../shared/bench/WORKLOADS.md``): bank-full.csv.gz, ``duration`` dropped, one-hot
categoricals, standardised numerics, stratified 80/20 split with seed 0. Each model is trained
once in plaintext; the test split is then scored ``--runs`` times under encryption with fresh
keys, and the medians are reported (logistic regression with both parameter profiles, precise
and fast): amortised microseconds per record for the whole path (client encrypt + server
evaluate + client decrypt) and for the server alone, wall and CPU time (CPU of the calling
process only: helper processes are not included), and
ciphertext bytes per record (upload + result). Reference point from the issue: Concrete ML takes
about 1 ms per record for logistic regression.

``--workers N`` shares each side's work over N processes (N-1 spawned helpers per side, see
``hefl.crypto.workers``; default: all cores). Helper start-up is reported separately
(``setup_s``) and also spread over the scored records (``us_per_record_with_setup``).
``--repeat K`` scores the test split K times over in one session (a larger, realistic batch that
amortises start-up and the last, partly filled ciphertext); accuracy is unchanged by it.
``--full-ciphertexts`` sends unseeded ciphertexts (twice the upload, no seed expansion).

With ``--json`` exactly one JSON object is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

from hefl.data.tabular import Preprocessor, load_bank, shared_data, stratified_split
from hefl.inference.bench import auc
from hefl.inference.engine import params_for, score_encrypted
from hefl.inference.mlp import train_poly_mlp
from hefl.inference.model import LinearModel

DEFAULT = shared_data("bank_marketing", "bank-full.csv.gz")


def _model_row(name: str, model, x: np.ndarray, y: np.ndarray, runs: int,
               profile: str = "precise", workers: int = 1, seeded: bool = True) -> dict:
    plain = model.logits(x)
    timings, enc = [], None
    for _ in range(runs):
        enc, t = score_encrypted(model, x, profile=profile, workers=workers, seeded=seeded)
        timings.append(t)
    assert enc is not None
    p = params_for(model, profile)
    return {
        "model": name,
        "features": int(x.shape[1]),
        "records": int(len(x)),
        "ckks": f"N={p.poly_modulus_degree} q={list(p.coeff_mod_bit_sizes)}",
        "accuracy_plain": float(((plain > 0) == y).mean()),
        "accuracy_encrypted": float(((enc > 0) == y).mean()),
        "auc_plain": auc(y, plain),
        "auc_encrypted": auc(y, enc),
        "max_abs_logit_error": float(np.abs(enc - plain).max()),
        "workers": workers,
        "seeded": seeded,
        "us_per_record": statistics.median(t.us_per_record for t in timings),
        "setup_s": statistics.median(t.setup_s for t in timings),
        "us_per_record_with_setup": statistics.median(t.us_per_record_with_setup
                                                      for t in timings),
        "server_us_per_record": statistics.median(t.server_us_per_record for t in timings),
        "cpu_us_per_record": statistics.median(t.cpu_us_per_record for t in timings),
        "server_cpu_us_per_record": statistics.median(t.server_cpu_us_per_record
                                                      for t in timings),
        "ciphertext_bytes_per_record": statistics.median(t.bytes_per_record for t in timings),
        "us_per_record_runs": [round(t.us_per_record, 2) for t in timings],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="W5 encrypted inference benchmark")
    ap.add_argument("--data", type=Path, default=DEFAULT)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--full-ciphertexts", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"bank data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    import torch
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(1)
    table = load_bank(args.data)
    labels = (table["y"] == "yes").astype(int)
    tr, te = stratified_split(labels, 0.2, seed=0)
    train, test = table.take(tr), table.take(te)
    pre = Preprocessor.fit(train, target="y", positive="yes")
    x_tr, y_tr = pre.transform(train), pre.labels(train)
    x_te, y_te = pre.transform(test), pre.labels(test)
    x_te, y_te = np.tile(x_te, (args.repeat, 1)), np.tile(y_te, args.repeat)
    lr = LinearModel.from_sklearn(LogisticRegression(max_iter=2000).fit(x_tr, y_tr))
    mlp = train_poly_mlp(x_tr, y_tr, hidden=args.hidden, epochs=10, lr=3e-3, seed=0)
    kw = {"workers": args.workers, "seeded": not args.full_ciphertexts}
    rows = [_model_row("LR", lr, x_te, y_te, args.runs, **kw),
            _model_row("LR (fast)", lr, x_te, y_te, args.runs, profile="fast", **kw),
            _model_row(f"MLP {x_tr.shape[1]}-{args.hidden}-1", mlp, x_te, y_te, args.runs, **kw)]
    out = {
        "workload": "W5",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": args.runs,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "models": rows,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"W5 encrypted inference, {len(x_te)} records, {args.workers} process(es) "
                    f"per side, medians of {args.runs} runs (load average {out['load_average']})")
    for col in ("model", "acc plain", "acc enc", "AUC plain", "AUC enc", "us/rec (cpu)",
                "with start-up", "server us/rec (cpu)", "bytes/rec"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["model"], f"{r['accuracy_plain']:.4f}", f"{r['accuracy_encrypted']:.4f}",
                  f"{r['auc_plain']:.4f}", f"{r['auc_encrypted']:.4f}",
                  f"{r['us_per_record']:.1f} ({r['cpu_us_per_record']:.1f})",
                  f"{r['us_per_record_with_setup']:.1f}",
                  f"{r['server_us_per_record']:.1f} ({r['server_cpu_us_per_record']:.1f})",
                  f"{r['ciphertext_bytes_per_record']:.0f}")
    Console().print(t)
    for r in rows:
        print(f"{r['model']}: CKKS {r['ckks']}, max |logit error| {r['max_abs_logit_error']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
