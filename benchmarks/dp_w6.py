"""Workload W6 (issue 13): final test accuracy of DP-FedAvg against epsilon, in three modes.

Digits (W1 data and model), 1000 clients, IID split, 100 clients per round (Poisson sampled),
50 rounds, FedAvg client lr 0.05, server lr 1.0, clip 1.0, delta 1e-5; for each epsilon in
{1, 2, 4, 8, inf}: plaintext central DP, BFV central DP (key-holder custody) and BFV
distributed DP (Skellam noise added by each client; key-holder custody), three seeds each.

    python benchmarks/dp_w6.py [--seeds 3] [--workers 2] [--modes plain-central,...] [--json]
                               [--plot accuracy.png]

Prints a table of mean accuracy (and the noise multiplier each mode needs), or one JSON object:
{"runs": [...], "mean": {mode: {epsilon: accuracy}}, "noise_multiplier": {...}}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
MODES = ("plain-central", "bfv-central", "bfv-distributed")
N, K, ROUNDS, CLIP, DELTA = 1000, 100, 50, 1.0, 1e-5


def one(job: tuple[str, float, int]) -> dict:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("hefl").setLevel(logging.ERROR)
    import hefl
    from hefl.algorithms import fedavg
    from hefl.crypto import make_aggregator
    from hefl.workloads import digits, set_torch_threads

    mode, eps, seed = job
    set_torch_threads(1)
    wl = digits(num_clients=N, partition="iid", rounds=ROUNDS, clients_per_round=K)
    size = wl.model.init_vector().size
    plan = hefl.dp(epsilon=eps, delta=DELTA, clip=CLIP,
                   mode=mode.split("-")[1]).plan(N, K, ROUNDS, size)
    agg = None
    if mode.startswith("bfv"):
        agg = make_aggregator("bfv", size, custody="keyholder", seed=seed,
                              **plan.aggregator_options())
    t0 = time.perf_counter()
    res = hefl.simulate(wl.model, wl.data, fedavg(client_lr=0.05), rounds=ROUNDS,
                        clients_per_round=K, seed=seed, test=wl.test, aggregator=agg,
                        backend="vectorized", privacy=plan, progress=False)
    last = res.history.records[-1]
    return {"mode": mode, "epsilon": eps, "seed": seed, "accuracy": last.metrics["test_accuracy"],
            "noise_multiplier": plan.noise_multiplier, "epsilon_spent": last.dp_epsilon,
            "skipped": sum(r.skipped for r in res.history), "wall_s": time.perf_counter() - t0}


def plot(mean: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [e if math.isfinite(e) else 16.0 for e in EPSILONS]
    for mode in mean:
        ax.plot(xs, [mean[mode][str(e)] for e in EPSILONS], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(int(e)) if math.isfinite(e) else "inf" for e in EPSILONS])
    ax.set_xlabel("epsilon (delta 1e-5, 50 rounds)")
    ax.set_ylabel("final test accuracy (mean of seeds)")
    ax.set_title("W6: DP-FedAvg on digits, 1000 clients, 100 per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", default="")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated subset of " + ", ".join(MODES))
    a = ap.parse_args()
    modes = tuple(m for m in MODES if m in a.modes.split(","))
    if not modes or set(a.modes.split(",")) - set(MODES):
        ap.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    jobs = [(m, e, s) for s in range(a.seeds) for e in EPSILONS for m in modes]
    if a.workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(a.workers) as pool:
            runs = pool.map(one, jobs, chunksize=1)
    else:
        runs = [one(j) for j in jobs]
    mean: dict = {m: {} for m in modes}
    z: dict = {m: {} for m in modes}
    for m in modes:
        for e in EPSILONS:
            accs = [r["accuracy"] for r in runs if r["mode"] == m and r["epsilon"] == e]
            mean[m][str(e)] = sum(accs) / len(accs)
            z[m][str(e)] = next(r["noise_multiplier"] for r in runs
                                if r["mode"] == m and r["epsilon"] == e)
    if a.plot:
        plot(mean, a.plot)
    paired = {}  # per seed, distributed minus plain central: its mean and standard error
    if {"plain-central", "bfv-distributed"} <= set(modes):
        for e in EPSILONS:
            acc = {(r["mode"], r["seed"]): r["accuracy"] for r in runs if r["epsilon"] == e}
            d = [acc["bfv-distributed", s] - acc["plain-central", s] for s in range(a.seeds)]
            m = sum(d) / len(d)
            se = (math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
                  if len(d) > 1 else math.nan)
            paired[str(e)] = {"mean": m, "se": se}
    if a.json:
        print(json.dumps({"runs": runs, "mean": mean, "noise_multiplier": z,
                          "distributed_minus_plain": paired}))
        return
    print(f"W6: mean final test accuracy over {a.seeds} seed(s) (noise multiplier)")
    print(f"{'epsilon':>8} " + " ".join(f"{m:>22}" for m in modes)
          + f" {'distributed - plain (se)':>26}")
    for e in EPSILONS:
        cells = " ".join(f"{mean[m][str(e)]:>14.4f} ({z[m][str(e)]:5.2f})" for m in modes)
        p = paired.get(str(e))
        print(f"{e:>8} {cells}" + (f" {p['mean']:>+18.4f} ({p['se']:.4f})" if p else ""))


if __name__ == "__main__":
    main()
