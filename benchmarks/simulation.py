"""Workload W1 (../shared/bench/WORKLOADS.md): hefl's simulation vs a hand-written loop.

Each measurement is a fresh Python process (so wall time includes interpreter start and imports,
as a user sees it); implementations alternate, and medians over ``--repeat`` runs are reported.

    python benchmarks/simulation.py --config b            # table: hefl vs hand-written, 3 runs
    python benchmarks/simulation.py --config b --json     # one JSON object (hefl's figures)
    python benchmarks/simulation.py --config b --impl hefl --repeat 1

JSON keys: config, wall_s, s_per_round, peak_rss_mib, final_accuracy, backend, device, runs,
plus ``handwritten`` (the same keys for the hand-written loop) and ``overhead`` (ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child_hefl(config: str, backend: str, device: str) -> dict:
    """Runs inside the measured process."""
    sys.path.insert(0, str(ROOT))
    import hefl
    from hefl import workloads

    workloads.seed_everything_for_torch(1)
    wl = workloads.w1(config)
    algo = hefl.fedavg(client_lr=wl.client_lr, batch_size=wl.batch_size)
    t0 = time.perf_counter()
    res = hefl.simulate(
        wl.model,
        wl.data,
        algo,
        rounds=wl.rounds,
        clients_per_round=wl.clients_per_round,
        seed=0,
        test=wl.test,
        backend=backend,
    )
    loop_s = time.perf_counter() - t0
    return {
        "s_per_round": loop_s / wl.rounds,
        "final_accuracy": res.history.records[-1].metrics["test_accuracy"],
    }


def child_handwritten(config: str) -> dict:
    sys.path.insert(0, str(HERE))
    from handwritten_w1 import train

    return train(config)


def measure(impl: str, config: str, backend: str, device: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        impl,
        "--config",
        config,
        "--backend",
        backend,
        "--device",
        device,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def median_of(runs: list[dict]) -> dict:
    keys = ("wall_s", "s_per_round", "peak_rss_mib", "final_accuracy")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", choices=["a", "b", "c"], default="a")
    ap.add_argument("--impl", choices=["both", "hefl", "handwritten"], default="both")
    ap.add_argument("--backend", default="sequential")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["hefl", "handwritten"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = (
            child_hefl(args.config, args.backend, args.device)
            if args.child == "hefl"
            else child_handwritten(args.config)
        )
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    impls = ["hefl", "handwritten"] if args.impl == "both" else [args.impl]
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.repeat):
        for impl in impls:  # alternate, so both see the same machine load
            runs[impl].append(measure(impl, args.config, args.backend, args.device))
    med = {impl: median_of(r) for impl, r in runs.items()}
    main_impl = impls[0]
    out = {
        "config": args.config,
        **med[main_impl],
        "backend": args.backend,
        "device": args.device,
        "runs": args.repeat,
    }
    if main_impl != "hefl":
        out["impl"] = main_impl
    if "handwritten" in med and main_impl == "hefl":
        hw = med["handwritten"]
        out["handwritten"] = hw
        out["overhead"] = {
            "wall_ratio": out["wall_s"] / hw["wall_s"],
            "per_round_ratio": out["s_per_round"] / hw["s_per_round"],
            "rss_ratio": out["peak_rss_mib"] / hw["peak_rss_mib"],
        }
    if args.json:
        print(json.dumps(out))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"W1 config {args.config}: medians of {args.repeat} runs ({args.backend}, {args.device})"
    )
    for col in ("impl", "wall_s", "s_per_round", "peak_rss_mib", "final_accuracy"):
        t.add_column(col)
    for impl, m in med.items():
        t.add_row(
            impl,
            f"{m['wall_s']:.2f}",
            f"{m['s_per_round']:.4f}",
            f"{m['peak_rss_mib']:.0f}",
            f"{m['final_accuracy']:.4f}",
        )
    Console().print(t)
    if "overhead" in out:
        o = out["overhead"]
        Console().print(
            f"hefl / hand-written: wall x{o['wall_ratio']:.3f}, per round "
            f"x{o['per_round_ratio']:.3f}, peak RSS x{o['rss_ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
