"""Workload W4 (../shared/bench/WORKLOADS.md): encrypted aggregation cost, ours vs NVFlare-style.

P float32 parameters uniform in [-1, 1] per client, ``--clients`` clients with integer weights
(sample counts in 1..1000, capped so their total fits the configuration), weighted average.
In the same process and run, for our configuration (default:
``make_aggregator("bfv", P, custody="clients")``) and for the baseline (TenSEAL CKKS N=8192,
coeff [60, 40, 60], scale 2^40, server multiplies by the weights):

- bytes one client uploads per parameter, and as a multiple of 4 bytes (fp32);
- client encrypt seconds (one client, one core; median over clients), including serialization;
- server aggregate seconds (from the clients' bytes to the serialized sum);
- decrypt seconds (from the sum's bytes to the mean);
- max abs error of the mean vs the plaintext weighted mean (float64);
- ours only, the deployment's verified decryption (``hefl.net.decrypt``): ``sign_s`` (one client:
  SHA-256 of its upload + Ed25519 signature), ``verify_s`` (key holder: every client's digest and
  signature), ``verified_decode_s`` (key holder: verify, recompute the sum from the clients'
  bytes, decrypt, ledger write) and ``decode_request_mb`` (what the key holder downloads);
  the deployed server's running sum (``RunningSum``): ``add_s`` (one update parsed, loaded and
  added as it arrives) and ``close_s`` (what is left when the last one is in: adding it and
  serializing the sum); outside custody threshold the server only checks the updates, as
  deployed (the key holder recomputes the sum).

Medians over ``--repeat`` runs (implementations alternate within each run). The process runs
with the memory settings of every ``hefl`` command (``hefl.tuning``: small pages, freed memory
reused), so that the figures are the deployment's.

    python benchmarks/he_aggregation.py --params 1000000 --clients 10
    python benchmarks/he_aggregation.py --params 100000 --clients 10 --json
    python benchmarks/he_aggregation.py --params 100000 --custody keyholder --bits 12 \
        --max-weight 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("bytes_per_param", "expansion_vs_fp32", "encrypt_s", "aggregate_s", "decrypt_s",
        "max_abs_err")
VERIFIED = ("sign_s", "verify_s", "verified_decode_s", "decode_request_mb", "add_s", "close_s")
THRESHOLD = ("partial_s", "fuse_s")


def measure(agg, xs: list[np.ndarray], ws: list[float]) -> dict:
    """One run of one aggregator over the clients' updates."""
    size = xs[0].size
    blobs, enc = {}, []
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        t0 = time.perf_counter()
        blobs[i] = agg.dumps(agg.encode(i, x, w))
        enc.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    total = agg.aggregate({i: agg.loads(b) for i, b in blobs.items()})
    sum_bytes = agg.dumps(total.payload)
    t1 = time.perf_counter()
    mean, _ = agg.decode(_reload(agg, total, sum_bytes))
    t2 = time.perf_counter()
    ref = sum(x.astype(np.float64) * w for x, w in zip(xs, ws, strict=True)) / sum(ws)
    nbytes = statistics.median(len(b) for b in blobs.values())
    custody = getattr(agg, "custody", None)
    verified = (_threshold(agg, total.payload) if custody == "threshold"
                else _verified(agg, blobs) if custody else {})
    return {
        **verified,
        **(_streamed(agg, blobs) if custody else {}),
        "bytes_per_param": nbytes / size,
        "expansion_vs_fp32": nbytes / (4 * size),
        "encrypt_s": statistics.median(enc),
        "aggregate_s": t1 - t0,
        "decrypt_s": t2 - t1,
        "max_abs_err": float(np.abs(mean - ref).max()),
    }


def _verified(agg, blobs: dict) -> dict:
    """Cost of signing, verifying and the key holder recomputing the sum (one round)."""
    import tempfile

    from hefl.net.decrypt import DecodeLedger, VerifiedDecryptor
    from hefl.net.identity import Identity, digest, statement
    from hefl.net.proto import hefl_pb2 as pb

    model = digest(b"global model bytes")
    ids = {i: Identity.generate() for i in blobs}
    sign, updates = [], []
    for i, b in blobs.items():
        t0 = time.perf_counter()
        sig = ids[i].sign(statement("bench", 1, "bench/1/1", model, digest(b)))
        sign.append(time.perf_counter() - t0)
        updates.append(pb.SignedUpdate(client=f"c{i}", task_id="bench/1/1", signature=sig,
                                       payload=b))
    body = pb.DecodeRequest(run_id="bench", round=1, model_digest=model,
                            updates=updates).SerializeToString()
    t0 = time.perf_counter()
    for u in updates:
        ids[int(u.client[1:])].key.public_key().verify(
            u.signature, statement("bench", 1, u.task_id, model, digest(u.payload)))
    verify = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ledger = DecodeLedger(Path(tmp) / "ledger.sqlite")
        dec = VerifiedDecryptor(agg.key_holder, {f"c{i}": k.public_hex for i, k in ids.items()},
                                ledger)
        t0 = time.perf_counter()
        dec.decode("bench", 1, body)
        decode = time.perf_counter() - t0
        ledger.close()
    return {"sign_s": statistics.median(sign), "verify_s": verify,
            "verified_decode_s": decode, "decode_request_mb": len(body) / 2**20}


def _streamed(agg, blobs: dict) -> dict:
    """The deployed server's running sum: ``add_s`` (median per update: parse, load, add, as
    it arrives) and ``close_s`` (the work left once the last update is in: adding it and
    serializing the sum). As deployed, only a threshold server keeps the sum: a key holder
    recomputes it from the signed updates, so there the server only checks them."""
    run = agg.server.running(keep=agg.custody == "threshold")
    payloads, adds = {}, []
    for i, b in blobs.items():
        t0 = time.perf_counter()
        payloads[i] = agg.server.loads(b)
        run.add(i, payloads[i])
        adds.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    run.aggregate(payloads)
    return {"add_s": statistics.median(adds), "close_s": adds[-1] + time.perf_counter() - t0}


def _threshold(agg, total) -> dict:
    """One member's partial decryption and the fusion of ``threshold`` partials, timed apart."""
    from hefl.crypto import threshold

    members = tuple(range(1, agg.spec.threshold + 1))
    committee = agg.key_holder
    cts = [agg.server.seal.ciphertext(b) for b in total.ciphertexts]
    t0 = time.perf_counter()
    parts = [committee.members[m].partial(total, members) for m in members]
    t1 = time.perf_counter()
    threshold.fuse(agg.spec, parts, cts)
    return {"partial_s": (t1 - t0) / len(members), "fuse_s": time.perf_counter() - t1}


def _reload(agg, total, sum_bytes):
    """The aggregate as the key holder receives it: from bytes."""
    from dataclasses import replace

    from hefl.crypto import EncryptedAggregator

    if isinstance(agg, EncryptedAggregator):
        return replace(total, payload=agg.key_holder.loads(sum_bytes))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--scheme", default="bfv", choices=["bfv", "ckks"])
    ap.add_argument("--custody", default="clients",
                    choices=["clients", "keyholder", "threshold"])
    ap.add_argument("--key-holders", type=int, default=None, help="threshold committee size")
    ap.add_argument("--threshold", type=int, default=None, help="members needed to decrypt")
    ap.add_argument("--bits", type=int, default=None, help="BFV quantization bits (default 16)")
    ap.add_argument("--max-weight", type=int, default=None, help="supported total weight")
    ap.add_argument("--max-clients", type=int, default=None, help="supported clients per sum")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes (this one included) for our clients' encryption and the key "
                         "holder's decryption (EncryptingClient/KeyHolder workers; real bytes)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from hefl.tuning import reuse_freed_memory, small_pages

    small_pages()  # the memory settings every hefl command runs with (hefl.tuning)
    reuse_freed_memory()
    from hefl.crypto import make_aggregator
    from hefl.crypto.baseline import NvflareBaseline

    rng = np.random.default_rng(args.seed)
    xs = [rng.uniform(-1, 1, args.params).astype(np.float32) for _ in range(args.clients)]
    options = {k: v for k, v in (("bits", args.bits), ("max_weight", args.max_weight),
                                 ("max_clients", args.max_clients),
                                 ("key_holders", args.key_holders),
                                 ("threshold", args.threshold)) if v}
    ours = make_aggregator(args.scheme, args.params, custody=args.custody,
                           min_clients=min(2, args.clients), seed=args.seed, **options)
    if args.workers > 1:
        from hefl.crypto import EncryptingClient, KeyHolder

        key = ours.key_holder.share if ours.custody == "clients" else ours.server.public
        ours.client = EncryptingClient(key, seed=args.seed, workers=args.workers)
        if isinstance(ours.key_holder, KeyHolder):
            ours.key_holder = KeyHolder(ours.key_holder.share, min_clients=min(2, args.clients),
                                        workers=args.workers)
    # sample counts up to 1000, kept within the configuration's supported total weight
    top = min(1000, ours.spec.max_weight // args.clients)
    ws = [float(w) for w in rng.integers(1, top + 1, args.clients)]
    base = None if args.no_baseline else NvflareBaseline(args.params)
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    for _ in range(args.repeat):
        runs["ours"].append(measure(ours, xs, ws))
        if base is not None:
            runs["baseline"].append(measure(base, xs, ws))
    med = {k: {key: statistics.median(r[key] for r in v) for key in (*KEYS, *VERIFIED, *THRESHOLD)
               if key in v[0]} for k, v in runs.items() if v}
    out = {"params": args.params, "clients": args.clients, **med["ours"],
           "baseline": {"params": args.params, "clients": args.clients, **med["baseline"]}
           if "baseline" in med else None}
    if args.json:
        print(json.dumps(out))
        return
    _table(out, repr(ours), args.repeat)


def _table(out: dict, ours: str, repeat: int) -> None:
    rows = [("ours", out)] + ([("NVFlare-style", out["baseline"])] if out["baseline"] else [])
    head = f"W4: P={out['params']:,} clients={out['clients']} (median of {repeat})\nours: {ours}"
    cols = ("", "B/param", "x fp32", "encrypt s", "aggregate s", "decrypt s", "max abs err")
    fmt = "{:<14}{:>9}{:>8}{:>11}{:>13}{:>11}{:>13}"
    lines = [head, fmt.format(*cols)]
    for name, r in rows:
        cells = (f"{r['bytes_per_param']:.2f}", f"{r['expansion_vs_fp32']:.2f}",
                 f"{r['encrypt_s']:.3f}", f"{r['aggregate_s']:.3f}", f"{r['decrypt_s']:.3f}",
                 f"{r['max_abs_err']:.1e}")
        lines.append(fmt.format(name, *cells))
    if out["baseline"]:
        b = out["baseline"]
        lines.append(
            f"ratio baseline/ours: bytes {b['bytes_per_param'] / out['bytes_per_param']:.1f}x, "
            f"encrypt {b['encrypt_s'] / out['encrypt_s']:.1f}x, "
            f"aggregate {b['aggregate_s'] / out['aggregate_s']:.1f}x, "
            f"decrypt {b['decrypt_s'] / out['decrypt_s']:.1f}x"
        )
    if "verified_decode_s" in out:
        lines.append(
            f"verified decryption (deployment): sign {out['sign_s'] * 1e3:.1f} ms per client, "
            f"verify all {out['verify_s'] * 1e3:.1f} ms, key holder verify + recompute sum + "
            f"decrypt {out['verified_decode_s']:.3f} s, request {out['decode_request_mb']:.1f} MB"
        )
    if "close_s" in out:
        lines.append(f"running sum (deployed server): {out['add_s']:.3f} s per update as it "
                     f"arrives, {out['close_s']:.3f} s left when the last one is in")
    if "partial_s" in out:
        lines.append(f"threshold: one member's partial decryption {out['partial_s']:.3f} s, "
                     f"fusing the partials {out['fuse_s']:.3f} s")
    try:
        from rich.console import Console

        Console(soft_wrap=True).print("\n".join(lines), highlight=False, markup=False)
    except ImportError:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
