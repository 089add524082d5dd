"""Workloads W1-W3 (../shared/bench/WORKLOADS.md): hefl's simulation backends, and for W1 a
hand-written loop.

Each measurement is a fresh Python process (so wall time includes interpreter start and imports,
as a user sees it); implementations alternate, and medians over ``--repeat`` runs are reported.

    python benchmarks/simulation.py --config b            # table: hefl vs hand-written, 3 runs
    python benchmarks/simulation.py --config b --json     # one JSON object (hefl's figures)
    python benchmarks/simulation.py --config b --impl hefl --repeat 1
    python benchmarks/simulation.py --config c --backend sequential,vectorized  # side by side
    python benchmarks/simulation.py --workload w2 --data ../shared/data/femnist_leaf \
        --backend sequential,vectorized --device cuda --rounds 5 --clients-per-round 105

``--backend`` takes one backend or a comma list (all run in the same session, alternating);
the first is the main figure. W2/W3 have no hand-written loop; they evaluate the global model
after the last round only (``final_accuracy``), W1 after every round (as WORKLOADS.md says).

JSON keys: workload, config, wall_s, s_per_round, steady_s_per_round (median of rounds 2..R),
setup_s (building the runner), peak_rss_mib, final_accuracy, backend, device, runs, plus
``handwritten`` (W1) and ``backends`` (the other backends' figures) and ``overhead`` (ratios of
the main backend to each of them). Peak RSS is the measured process's; Ray's worker processes
are not counted in it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = {"w2": "femnist_leaf", "w3": "shakespeare_tff"}


def _workload(args: argparse.Namespace):
    from hefl import workloads

    if args.workload == "w1":
        return workloads.w1(args.config)
    shared = Path(os.environ.get("HEFL_SHARED_DATA", ROOT.parent / "shared" / "data"))
    data = Path(args.data or shared / DATA[args.workload])
    device = "cpu" if args.backend == "ray" else args.device  # the model adapter's device
    if args.workload == "w2":
        return workloads.femnist(data, device=device)
    return workloads.shakespeare(data, device=device, test_limit=args.test_limit)


def child_hefl(args: argparse.Namespace) -> dict:
    """Runs inside the measured process."""
    sys.path.insert(0, str(ROOT))
    import hefl
    from hefl import workloads
    from hefl.backends import make_runner

    workloads.set_torch_threads(1)
    wl = _workload(args)
    rounds = args.rounds or wl.rounds
    per_round = args.clients_per_round or wl.clients_per_round
    algo = hefl.fedavg(client_lr=wl.client_lr, batch_size=wl.batch_size)
    options = {"device": args.device} if args.backend == "vectorized" else {}
    if args.backend == "sequential" and args.workload == "w1" and args.device != "cpu":
        raise SystemExit(
            "W1's sequential backend runs on the CPU (its model adapter is built there)"
        )
    t0 = time.perf_counter()
    runner = make_runner(wl.model, wl.data, args.backend, **options)
    setup = time.perf_counter() - t0
    every = args.eval_every or (1 if args.workload == "w1" else rounds)
    done = {"n": 0}
    curve: list[tuple[int, float]] = []

    def evaluate(params):
        done["n"] += 1
        if done["n"] % every and done["n"] != rounds:
            return {}
        m = wl.model.evaluate(params, wl.test)
        curve.append((done["n"], m["accuracy"]))
        if args.workload != "w1":
            print(f"round {done['n']}: accuracy {m['accuracy']:.4f}", file=sys.stderr, flush=True)
        return m

    t0 = time.perf_counter()
    res = hefl.run(
        runner,
        wl.model.init_vector(),
        algo,
        rounds=rounds,
        clients_per_round=per_round,
        seed=0,
        evaluate=evaluate,
    )
    loop_s = time.perf_counter() - t0
    if hasattr(runner, "close"):
        runner.close()
    walls = [r.wall_s for r in res.history.records]
    return {
        "s_per_round": loop_s / rounds,
        "steady_s_per_round": statistics.median(walls[1:] if len(walls) > 1 else walls),
        "setup_s": setup,
        "final_accuracy": res.history.records[-1].metrics["test_accuracy"],
        "runner": type(runner).__name__,
        "accuracy_curve": curve if args.workload != "w1" else None,
    }


def child_handwritten(config: str) -> dict:
    sys.path.insert(0, str(HERE))
    from handwritten_w1 import train

    return train(config)


def measure(impl: str, args: argparse.Namespace, backend: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl]
    for key in (
        "workload",
        "config",
        "device",
        "rounds",
        "clients_per_round",
        "data",
        "test_limit",
        "eval_every",
    ):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += ["--backend", backend]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{impl} ({backend}) run failed:\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


KEYS = ("wall_s", "s_per_round", "steady_s_per_round", "setup_s", "peak_rss_mib", "final_accuracy")


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in KEYS if k in runs[0]}


def ratios(a: dict, b: dict) -> dict:
    return {
        "wall_ratio": a["wall_s"] / b["wall_s"],
        "per_round_ratio": a["s_per_round"] / b["s_per_round"],
        "rss_ratio": a["peak_rss_mib"] / b["peak_rss_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", choices=["w1", "w2", "w3"], default="w1")
    ap.add_argument("--config", choices=["a", "b", "c"], default="a", help="W1 config")
    ap.add_argument("--impl", choices=["both", "hefl", "handwritten"], default="both")
    ap.add_argument(
        "--backend", default="sequential", help="sequential, vectorized, ray, or a list"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, help="default: the workload's")
    ap.add_argument("--clients-per-round", type=int, help="default: the workload's")
    ap.add_argument("--data", help="W2/W3 data folder (default ../shared/data/...)")
    ap.add_argument("--test-limit", type=int, help="W3: evaluate on this many test sequences")
    ap.add_argument("--eval-every", type=int, help="default: every round (W1), last round (W2/W3)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["hefl", "handwritten"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = child_hefl(args) if args.child == "hefl" else child_handwritten(args.config)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("sequential", "vectorized", "ray")]
    if bad or not backends:
        raise SystemExit(f"unknown backend(s) {bad}; choose from sequential, vectorized, ray")
    if args.workload != "w1" and args.impl != "hefl":
        args.impl = "hefl"  # only W1 has a hand-written loop
    jobs: list[tuple[str, str]] = []
    if args.impl in ("both", "hefl"):
        jobs += [("hefl", b) for b in backends]
    if args.impl in ("both", "handwritten"):
        jobs.append(("handwritten", "-"))
    runs: dict[tuple[str, str], list[dict]] = {j: [] for j in jobs}
    for _ in range(args.repeat):
        for impl, backend in jobs:  # alternate, so all see the same machine load
            runs[(impl, backend)].append(measure(impl, args, backend))
    med = {j: median_of(r) for j, r in runs.items()}
    main_job = jobs[0]
    out = {
        "workload": args.workload,
        "config": args.config if args.workload == "w1" else None,
        **med[main_job],
        "backend": main_job[1] if main_job[0] == "hefl" else None,
        "device": args.device,
        "runs": args.repeat,
    }
    if main_job[0] != "hefl":
        out["impl"] = main_job[0]
    else:
        out["runner"] = runs[main_job][0]["runner"]  # which runner really ran (fallbacks)
        if args.workload != "w1":
            out["accuracy_curve"] = runs[main_job][0]["accuracy_curve"]
    others = [j for j in jobs[1:] if j[0] == "hefl"]
    if others:
        out["backends"] = {b: med[(i, b)] for i, b in others}
        out["overhead_vs"] = {b: ratios(med[main_job], med[(i, b)]) for i, b in others}
    if ("handwritten", "-") in med and main_job[0] == "hefl":
        hw = med[("handwritten", "-")]
        out["handwritten"] = hw
        out["overhead"] = ratios(med[main_job], hw)
    if args.json:
        print(json.dumps(out))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{args.workload} {out['config'] or ''}: medians of {args.repeat} runs ({args.device})"
    )
    for col in ("impl", "wall_s", "s_per_round", "steady_s_per_round", "peak_rss_mib", "accuracy"):
        t.add_column(col)
    for (impl, backend), m in med.items():
        t.add_row(
            impl if impl != "hefl" else f"hefl {backend}",
            f"{m['wall_s']:.2f}",
            f"{m['s_per_round']:.4f}",
            f"{m['steady_s_per_round']:.4f}" if "steady_s_per_round" in m else "-",
            f"{m['peak_rss_mib']:.0f}",
            f"{m['final_accuracy']:.4f}",
        )
    Console().print(t)
    name = f"hefl {main_job[1]}" if main_job[0] == "hefl" else main_job[0]
    for other, o in [
        *out.get("overhead_vs", {}).items(),
        *([("hand-written", out["overhead"])] if "overhead" in out else []),
    ]:
        Console().print(
            f"{name} / {other}: wall x{o['wall_ratio']:.3f}, per round "
            f"x{o['per_round_ratio']:.3f}, peak RSS x{o['rss_ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
