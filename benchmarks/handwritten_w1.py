"""Workload W1 as a hand-written PyTorch loop (no hefl): the yardstick for framework overhead.

Exactly the work of ../shared/bench/WORKLOADS.md W1: same split, scaling, Dirichlet partition,
model init, per-client shuffling, client sampling, weighted FedAvg, evaluation each round.

    python benchmarks/handwritten_w1.py --config b
"""

from __future__ import annotations

import argparse
import json
import resource
import time

CONFIGS = {"a": (10, 10, 20), "b": (100, 10, 30), "c": (1000, 50, 10)}


def train(config: str) -> dict:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    torch.set_num_threads(1)
    n_clients, per_round, rounds = CONFIGS[config]
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0)
    sc = StandardScaler().fit(x_tr)
    x_tr = torch.tensor(sc.transform(x_tr), dtype=torch.float32)
    x_te = torch.tensor(sc.transform(x_te), dtype=torch.float32)
    y_tr, y_te = torch.tensor(y_tr), torch.tensor(y_te)

    rng = np.random.default_rng(0)
    parts = [[] for _ in range(n_clients)]
    for k in range(10):
        idx = np.flatnonzero(y_tr.numpy() == k)
        rng.shuffle(idx)
        p = rng.dirichlet(0.5 * np.ones(n_clients))
        for c, chunk in enumerate(np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])):
            parts[c].append(chunk)
    parts = [torch.tensor(np.concatenate(p)) for p in parts]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.optim.SGD(model.parameters(), lr=0.05)  # first optimizer imports torch._dynamo (~2 s):
    # paid here, outside the timed loop, so s_per_round compares training work only
    t_loop = time.perf_counter()
    acc = 0.0
    for r in range(1, rounds + 1):
        if per_round >= n_clients:
            chosen = list(range(n_clients))
        else:
            chosen = sorted(
                np.random.default_rng([0, r]).choice(n_clients, per_round, replace=False)
            )
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        weight = 0
        for c in chosen:
            idx = parts[c]
            n = len(idx)
            if n == 0:
                continue
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            g = torch.Generator().manual_seed(r * 1_000_003 + int(c))
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, 32):
                b = idx[perm[s : s + 32]]
                opt.zero_grad()
                loss_fn(model(x_tr[b]), y_tr[b]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                total[k] += v * n
            weight += n
        if weight:
            global_state = {k: v / weight for k, v in total.items()}
        model.load_state_dict(global_state)
        with torch.no_grad():
            acc = float((model(x_te).argmax(1) == y_te).float().mean())
    loop_s = time.perf_counter() - t_loop
    return {"config": config, "s_per_round": loop_s / rounds, "final_accuracy": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="a")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = train(args.config)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res) if args.json else res)


if __name__ == "__main__":
    main()
