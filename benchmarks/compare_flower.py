"""W1 side by side: Flower's Ray simulation vs hefl (sequential and vectorized), same machine, one run.

Never part of ``make test``. Flower lives in its own virtualenv so it cannot disturb hefl's:

    python benchmarks/compare_flower.py --setup            # once: .bench-venv-flower + flwr[simulation]
    python benchmarks/compare_flower.py --config c         # 3 runs each, alternating; table + ratios
    python benchmarks/compare_flower.py --config b --json  # one JSON object

``--setup`` makes ``.bench-venv-flower`` (git-ignored) and installs ``flwr[simulation]`` from PyPI
into it. torch, numpy and scikit-learn are reused from the interpreter running this script (a
``.pth`` file adds its site-packages after the venv's own): PyPI's default torch wheel would pull
gigabytes of CUDA libraries, and the same torch build on both sides keeps the comparison about the
frameworks. Packages that Flower pins (ray, grpcio, protobuf, ...) are installed into the venv,
where they take precedence.

The Flower run is the identical workload (../shared/bench/WORKLOADS.md W1): hefl's W1 data split and
model init (``hefl.workloads.w1``, so both sides train the same clients on the same data), the W1
client sampling (a strategy that hands round r's W1-sampled partition ids to Flower's sampled
nodes), the same local SGD (shuffle seeds, batch 32, lr 0.05, one epoch), FedAvg weighted by
examples, central evaluation on the test set every round, torch with one thread. It uses Flower's
ServerApp/ClientApp and ``flwr.simulation.run_simulation`` with the Ray backend, one CPU per client.

Figures per implementation (medians): ``wall_s`` (the whole process, as a user sees it),
``steady_s_per_round`` (median time between consecutive central evaluations, rounds 2..R),
``peak_pss_mib`` (peak proportional set size of the process and all its descendants, Ray's
workers included, sampled every 0.1 s), ``final_accuracy``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = ROOT / ".bench-venv-flower"
FLWR_PIN = "flwr[simulation]==1.42.0"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def setup() -> None:
    """Create the Flower virtualenv and install flwr[simulation] into it (PyPI only)."""
    import site
    import sysconfig

    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    purelib = subprocess.run(
        [str(venv_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).exists()] or [
        sysconfig.get_paths()["purelib"]
    ]
    Path(purelib, "hefl_bench_torch.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [str(venv_python()), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True
    )
    subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", FLWR_PIN], check=True)
    print(f"Flower installed in {VENV}")


# --------------------------------------------------------------------------- the Flower side
def flower_child(config: str) -> dict:
    """Runs inside the Flower venv: W1 with Flower's simulation engine."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, FitIns, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from hefl.client import FitConfig
    from hefl.rounds import sample_clients, shuffle_seed
    from hefl.workloads import w1

    torch.set_num_threads(1)
    wl = w1(config)
    spec, model = wl.model.spec, wl.model
    ids = list(wl.data.ids)
    n_clients, per_round, rounds = len(ids), wl.clients_per_round, wl.rounds
    eval_times: list[float] = []
    accuracy: list[float] = []

    def to_arrays(vec):
        return [spec.unflatten(vec)[n] for n in spec.names]

    def to_vec(arrays):
        return spec.flatten(dict(zip(spec.names, arrays, strict=True)))

    class W1Client(NumPyClient):
        def fit(self, parameters, config):
            torch.set_num_threads(1)
            pid = int(config["partition"])
            data = wl.data[ids[pid]]
            if len(data) == 0:
                return parameters, 0, {}
            cfg = FitConfig(
                round=int(config["round"]),
                lr=wl.client_lr,
                epochs=1,
                batch_size=wl.batch_size,
                seed=int(config["seed"]),
            )
            new, _ = model.fit(to_vec(parameters), data, cfg)
            return to_arrays(new), len(data), {}

    class W1Sampling(FedAvg):
        """FedAvg whose round r trains the W1-sampled partitions (on whichever nodes Flower
        samples), so the work equals hefl's and the hand-written loop's."""

        def configure_fit(self, server_round, parameters, client_manager):
            chosen = sample_clients(n_clients, per_round, 0, server_round)
            client_manager.wait_for(len(chosen))
            proxies = client_manager.sample(len(chosen), min_num_clients=len(chosen))
            return [
                (
                    proxy,
                    FitIns(
                        parameters,
                        {
                            "partition": pid,
                            "round": server_round,
                            "seed": shuffle_seed(0, server_round, pid),
                        },
                    ),
                )
                for proxy, pid in zip(proxies, chosen, strict=True)
            ]

    def evaluate(server_round, parameters, config):
        m = model.evaluate(to_vec(parameters), wl.test)
        eval_times.append(time.perf_counter())
        accuracy.append(m["accuracy"])
        return m["loss"], {"accuracy": m["accuracy"]}

    def server_fn(context: Context):
        strategy = W1Sampling(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=1,
            min_evaluate_clients=0,
            min_available_clients=n_clients,
            initial_parameters=ndarrays_to_parameters(to_arrays(model.init_vector())),
            evaluate_fn=evaluate,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    def client_fn(context: Context):
        return W1Client().to_client()

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=n_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False},
        },
    )
    steps = np.diff(eval_times)  # eval_times[0] is the initial model's evaluation (round 0)
    return {
        "steady_s_per_round": float(np.median(steps[1:] if len(steps) > 1 else steps)),
        "final_accuracy": accuracy[-1],
    }


# --------------------------------------------------------------------------- the hefl side
def hefl_child(config: str, backend: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import hefl
    from hefl import workloads
    from hefl.backends import make_runner

    workloads.set_torch_threads(1)
    wl = workloads.w1(config)
    res = hefl.run(
        make_runner(wl.model, wl.data, backend),
        wl.model.init_vector(),
        hefl.fedavg(client_lr=wl.client_lr, batch_size=wl.batch_size),
        rounds=wl.rounds,
        clients_per_round=wl.clients_per_round,
        evaluate=lambda p: wl.model.evaluate(p, wl.test),
    )
    walls = [r.wall_s for r in res.history.records]
    return {
        "steady_s_per_round": statistics.median(walls[1:]),
        "final_accuracy": res.history.records[-1].metrics["test_accuracy"],
    }


# --------------------------------------------------------------------------- measuring
def _tree_pss_kib(root: int) -> int:
    """Sum of Pss over ``root`` and its descendants (from /proc; 0 where unreadable)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(impl: str, config: str) -> dict:
    python = str(venv_python()) if impl == "flower" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--child", impl, "--config", config]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_pss_kib(proc.pid))
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{err[-4000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall_s=wall, peak_pss_mib=peak / 1024)
    return res


IMPLS = ("flower", "hefl-sequential", "hefl-vectorized")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the Flower venv, then exit")
    ap.add_argument("--config", choices=["a", "b", "c"], default="b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    if args.child:
        res = (
            flower_child(args.config)
            if args.child == "flower"
            else hefl_child(args.config, args.child.split("-", 1)[1])
        )
        print(json.dumps(res))
        return
    if not venv_python().exists():
        raise SystemExit(f"no Flower venv at {VENV}: run `python {__file__} --setup` first")
    runs: dict[str, list[dict]] = {i: [] for i in IMPLS}
    for _ in range(args.repeat):
        for impl in IMPLS:  # alternate, so all see the same machine load
            runs[impl].append(measure(impl, args.config))
    keys = ("wall_s", "steady_s_per_round", "peak_pss_mib", "final_accuracy")
    med = {i: {k: statistics.median(r[k] for r in rs) for k in keys} for i, rs in runs.items()}
    ratios = {
        i: {
            "wall": med["flower"]["wall_s"] / med[i]["wall_s"],
            "steady_round": med["flower"]["steady_s_per_round"] / med[i]["steady_s_per_round"],
            "pss": med["flower"]["peak_pss_mib"] / med[i]["peak_pss_mib"],
        }
        for i in IMPLS[1:]
    }
    out = {
        "config": args.config,
        "runs": args.repeat,
        "medians": med,
        "flower_over_hefl": ratios,
        "flower": FLWR_PIN,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"W1 config {args.config}, medians of {args.repeat} runs")
    print(f"{'impl':18} {'wall_s':>8} {'steady_s/round':>15} {'peak_pss_mib':>13} {'accuracy':>9}")
    for i, m in med.items():
        print(
            f"{i:18} {m['wall_s']:8.2f} {m['steady_s_per_round']:15.4f} "
            f"{m['peak_pss_mib']:13.0f} {m['final_accuracy']:9.4f}"
        )
    for i, r in ratios.items():
        print(
            f"Flower / {i}: wall x{r['wall']:.1f}, steady round x{r['steady_round']:.1f}, "
            f"PSS x{r['pss']:.1f}"
        )


if __name__ == "__main__":
    main()
