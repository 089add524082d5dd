"""``hefl simulate`` and ``hefl demo`` (registered on the top-level app by ``hefl.cli``).

hefl simulate [options]     federated training simulated on this machine
hefl demo                   the README's demo: digits across 100 clients, encrypted updates
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from hefl.errors import ConfigError, HeflError

app = typer.Typer()  # holds this module's commands; hefl.cli registers them
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

DATASETS = ("digits", "femnist", "shakespeare")
BACKENDS = ("sequential", "vectorized", "ray")


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


@dataclass(frozen=True)
class SimulateOptions:
    """Everything ``hefl simulate`` takes (defaults: the README's example)."""

    dataset: str = "digits"
    data: Path | None = None
    partition: str = "dirichlet"
    alpha: float = 0.5
    clients: int | None = None
    clients_per_round: int | None = None
    rounds: int = 20
    algorithm: str = "fedavg"
    client_lr: float | None = None
    server_lr: float | None = None
    mu: float | None = None
    epochs: int = 1
    batch_size: int | None = None
    seed: int = 0
    threads: int = 1
    he: str | None = None
    he_workers: int | None = None
    backend: str = "sequential"
    device: str = "auto"
    custody: str = "clients"
    key_holders: int | None = None
    threshold: int | None = None
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_mode: str | None = None
    dp_noise_multiplier: float | None = None
    dp_min_clients: int | None = None
    csv: Path | None = None
    target: str | None = None
    sep: str | None = None
    drop: tuple[str, ...] = ()
    partition_by: str | None = None
    model: str | None = None
    positive: str | None = None
    test_size: float = 0.2

    @property
    def privacy(self):
        """The DP config these options ask for (None: no DP)."""
        if self.dp_epsilon is None and self.dp_noise_multiplier is None:
            if self.dp_mode is not None:
                raise ConfigError("--dp-mode needs --dp-epsilon or --dp-noise-multiplier")
            return None
        from hefl.privacy import dp

        return dp(epsilon=self.dp_epsilon, delta=self.dp_delta, clip=self.dp_clip,
                  mode=self.dp_mode or "central", noise_multiplier=self.dp_noise_multiplier,
                  min_clients=self.dp_min_clients)


def _workload(o: SimulateOptions):
    """The data set, model and defaults behind ``--dataset`` or ``--csv`` (and ``--model``)."""
    if o.csv is not None:
        return _csv_workload(o)
    if o.target is not None or o.partition_by is not None:
        raise ConfigError("--target and --partition-by go with --csv PATH (your own data)")
    wl = _named_workload(o)
    if o.model is None:
        return wl
    if not o.model.endswith(".keras"):
        raise ConfigError(f"--model {o.model!r}: with --dataset give a Keras 3 model file "
                          "(PATH.keras); logreg and mlp go with --csv")
    from dataclasses import replace

    from hefl.models.keras import load_keras

    return replace(wl, model=load_keras(o.model))


def _named_workload(o: SimulateOptions):
    from hefl import workloads

    if o.dataset == "digits":
        return workloads.digits(
            num_clients=o.clients or 100, partition=o.partition, alpha=o.alpha, seed=o.seed
        )
    if o.dataset not in DATASETS:
        raise ConfigError(f"unknown data set {o.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if o.data is None:
        raise ConfigError(
            f"--dataset {o.dataset} needs --data PATH (e.g. ../shared/data/"
            f"{'femnist_leaf' if o.dataset == 'femnist' else 'shakespeare_tff'})"
        )
    build = workloads.femnist if o.dataset == "femnist" else workloads.shakespeare
    return build(o.data, seed=o.seed, device=_device(o))


def _csv_workload(o: SimulateOptions):
    """``--csv PATH --target COL``: the user's own table as a federation."""
    from hefl import workloads

    if o.target is None:
        raise ConfigError("--csv needs --target COL: the binary column to predict")
    if o.dataset != "digits" or o.data is not None:
        raise ConfigError("give either --csv PATH (your own table) or --dataset/--data, not both")
    if o.partition_by is not None and o.clients is not None:
        raise ConfigError("give --partition-by COL (one client per value) or --clients N, not "
                          "both")
    return workloads.tabular(
        o.csv, o.target, sep=o.sep, drop=o.drop, by=o.partition_by, clients=o.clients,
        partition=o.partition, alpha=o.alpha, model=o.model or "logreg", positive=o.positive,
        test_size=o.test_size, seed=o.seed,
    )


def _device(o: SimulateOptions) -> str:
    """Where client training runs: the vectorized backend's device ("auto": a GPU if torch sees
    one), else the CPU."""
    if o.backend != "vectorized":
        return "cpu"
    from hefl.backends.vectorized import resolve_device

    return str(resolve_device(o.device))


def run_simulation(
    o: SimulateOptions, *, out_dir: Path | None = None, progress: bool = False, on_round=None,
    save_model: Path | None = None,
) -> dict:
    """Run one simulation from CLI options; return the JSON summary."""
    from hefl import workloads
    from hefl.algorithms import make_algorithm
    from hefl.simulation import simulate

    if o.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {o.rounds}: no round, no training")
    t0 = time.perf_counter()
    workloads.set_torch_threads(o.threads)
    wl = _workload(o)
    k = o.clients_per_round if o.clients_per_round is not None else wl.clients_per_round
    if k > len(wl.data):
        raise ConfigError(f"--clients-per-round {k} is more than the "
                          f"{len(wl.data)} clients of this data set; give at most {len(wl.data)}")
    if save_model is not None and wl.export is None:
        raise ConfigError("--save-model writes the model file encrypted scoring loads: it "
                          "needs a --csv federation (logreg or mlp)")
    algo = make_algorithm(
        o.algorithm,
        client_lr=o.client_lr if o.client_lr is not None else wl.client_lr,
        server_lr=o.server_lr,
        mu=o.mu,
        epochs=o.epochs,
        batch_size=o.batch_size if o.batch_size is not None else wl.batch_size,
    )
    aggregator = None
    size = wl.model.spec.size
    plan = None
    if o.privacy is not None:
        if o.privacy.mode == "distributed" and o.he != "bfv":
            raise ConfigError("--dp-mode distributed adds each client's noise under BFV: add "
                              "--he bfv (with --custody keyholder or threshold)")
        plan = o.privacy.plan(len(wl.data), k, o.rounds, size)
    if o.he:
        from hefl.crypto import make_aggregator

        committee: dict[str, Any] = ({"key_holders": o.key_holders, "threshold": o.threshold}
                                     if o.custody == "threshold" else {})
        aggregator = make_aggregator(o.he, size, seed=o.seed, custody=o.custody, **committee,
                                     workers=o.he_workers or None,
                                     **(plan.aggregator_options() if plan else {}))
    try:
        result = simulate(
            wl.model, wl.data, algo, rounds=o.rounds, clients_per_round=k, seed=o.seed,
            test=wl.test, aggregator=aggregator, progress=progress, on_round=on_round,
            backend=o.backend,
            backend_options={"device": _device(o)} if o.backend == "vectorized" else None,
            privacy=plan,
        )
    finally:
        if aggregator is not None:
            aggregator.close()
    pooled = getattr(aggregator, "workers", 1) > 1
    stats = workloads.summary(result)
    summary = {
        "dataset": str(o.csv) if o.csv is not None else o.dataset,
        "algorithm": algo.name,
        "clients": len(wl.data),
        "clients_per_round": k,
        "he": o.he or "none",
        **({"custody": o.custody, "he_workers": getattr(aggregator, "workers", 1),
            "upload_bytes_estimated": pooled} if o.he else {}),
        **({"key_holders": aggregator.spec.parties, "threshold": aggregator.spec.threshold}
           if aggregator is not None and o.custody == "threshold" else {}),
        "backend": o.backend,
        "device": _device(o),
        **stats,
        "params": int(wl.model.spec.size),
        "upload_bytes_per_param": stats["upload_bytes_per_client"] / wl.model.spec.size,
        "wall_s": time.perf_counter() - t0,
    }
    if result.privacy is not None:
        summary["dp"] = result.privacy.to_json(len(result.history))
        if result.stopped:
            summary["stopped"] = result.stopped
    if wl.export is not None:
        summary["features"] = wl.split.preprocessing.n_features
        summary["model"] = o.model or "logreg"
        summary["parties"] = {name: len(t) for name, t in wl.split.parties.items()}
        summary["test_rows"] = len(wl.split.test)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.history.to_jsonl(out_dir / "history.jsonl")
        result.history.to_csv(out_dir / "history.csv")
        result.history.plot(out_dir / "history.png", title=_title(o, algo.name, len(wl.data), k))
        if wl.export is not None:
            save_model = save_model or out_dir / "model.json"
            if len(wl.split.test):
                summary["test_csv"] = str(wl.split.test.write_csv(out_dir / "test.csv"))
    if save_model is not None:
        assert wl.export is not None
        summary["model_file"] = str(wl.export(result.params).save(save_model))
    if out_dir is not None:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["out"] = str(out_dir)
    return summary


@app.command()
def simulate(
    dataset: str = typer.Option("digits", help="data set: " + ", ".join(DATASETS)),
    data: Path | None = typer.Option(
        None, help="data path for femnist (LEAF npz/JSON) or shakespeare (TFF h5 folder)"
    ),
    partition: str = typer.Option("dirichlet", help="dirichlet or iid"),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more skew)"),
    clients: int | None = typer.Option(
        None, help="number of clients (digits: 100, --csv: 10; femnist and shakespeare: one per "
        "writer/role)"),
    clients_per_round: int | None = typer.Option(
        None, "--clients-per-round", "-k", help="clients sampled each round (default 10, or "
        "every party of --partition-by; at most the number of clients)"),
    rounds: int = typer.Option(20, help="federated rounds to run"),
    algorithm: str = typer.Option(
        "fedavg", help="fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad"
    ),
    client_lr: float | None = typer.Option(None, help="client SGD rate (default: the data set's)"),
    server_lr: float | None = typer.Option(None, help="server learning rate (FedOpt/FedAvgM)"),
    mu: float | None = typer.Option(None, help="FedProx proximal coefficient"),
    epochs: int = typer.Option(1, help="local epochs"),
    batch_size: int | None = typer.Option(None, help="local batch size (default: the data set's)"),
    seed: int = typer.Option(0, help="seed of the split, the sampling and the model"),
    threads: int = typer.Option(1, help="torch intra-op threads"),
    he_workers: int = typer.Option(
        0, help="with --he: helper processes that encrypt and sum the updates while clients train "
        "(0: one per core; 1: serially, through the wire format)"),
    he: str | None = typer.Option(
        None, help="encrypt client updates: bfv (recommended), bfv-packed or ckks; default: no "
        "encryption"
    ),
    backend: str = typer.Option("sequential", help="client steps: " + ", ".join(BACKENDS)),
    device: str = typer.Option(
        "auto", help="vectorized backend device: auto (a GPU if torch sees one), cpu or cuda"),
    custody: str = typer.Option(
        "clients", help="with --he: who decrypts: clients, keyholder or threshold"
    ),
    key_holders: int | None = typer.Option(None, help="custody threshold: committee size (3)"),
    threshold: int | None = typer.Option(None, help="custody threshold: members needed (2)"),
    dp_epsilon: float | None = typer.Option(
        None, help="client-level DP: target epsilon over the rounds (a budget, with "
        "--dp-noise-multiplier)"),
    dp_delta: float = typer.Option(1e-5, help="DP delta"),
    dp_clip: float = typer.Option(1.0, help="DP: L2 clip of each client's update"),
    dp_mode: str | None = typer.Option(
        None, help="DP: central (noise where the sum is decrypted) or distributed (each client "
        "adds noise under BFV; no trusted party)"),
    dp_noise_multiplier: float | None = typer.Option(None, help="DP: fixed noise multiplier"),
    dp_min_clients: int | None = typer.Option(
        None, help="distributed DP: contributions the noise is sized for"),
    csv: Path | None = typer.Option(
        None, help="your own table: a CSV (.gz allowed) with a binary --target column; one "
        "client per value of --partition-by, or --clients N by --partition"),
    target: str | None = typer.Option(None, help="--csv: the binary column to predict"),
    sep: str | None = typer.Option(
        None, help="--csv separator (default: sniffed; ' ' splits on runs of spaces)"),
    drop: list[str] | None = typer.Option(
        None, help="--csv: a column to leave out, e.g. one that leaks the label (repeat)"),
    partition_by: str | None = typer.Option(
        None, help="--csv: one client per value of this column (e.g. a bank's branch)"),
    model: str | None = typer.Option(
        None, help="--csv: logreg (default) or mlp (one hidden layer, quadratic activation), "
        "both score encrypted with `hefl infer serve`; --dataset: a Keras 3 model file "
        "(PATH.keras, its input shaped like the data) instead of the data set's torch model"),
    positive: str | None = typer.Option(
        None, help="--csv: the target value that is class 1 (default: yes/1/true/bad, ...)"),
    test_size: float = typer.Option(
        0.2, help="--csv: share of rows held out (stratified) to test the model"),
    save_model: Path | None = typer.Option(
        None, help="--csv: write the trained model file (default with --out: OUT/model.json)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary"),
    out_dir: Path | None = typer.Option(
        None, "--out", help="write history (jsonl, csv), summary.json and a plot; with --csv "
        "also model.json and the held-out rows as test.csv"
    ),
) -> None:
    """Simulate federated training on this machine."""
    opts = SimulateOptions(
        dataset=dataset, data=data, partition=partition, alpha=alpha, clients=clients,
        clients_per_round=clients_per_round, rounds=rounds, algorithm=algorithm,
        client_lr=client_lr, server_lr=server_lr, mu=mu, epochs=epochs, batch_size=batch_size,
        seed=seed, threads=threads, he=he, he_workers=he_workers, backend=backend, device=device, custody=custody,
        key_holders=key_holders, threshold=threshold, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
        dp_clip=dp_clip, dp_mode=dp_mode, dp_noise_multiplier=dp_noise_multiplier,
        dp_min_clients=dp_min_clients, csv=csv, target=target, sep=sep, drop=tuple(drop or ()),
        partition_by=partition_by, model=model, positive=positive, test_size=test_size,
    )
    try:
        s = run_simulation(opts, out_dir=out_dir, progress=not as_json, save_model=save_model)
    except HeflError as e:
        _fail(e)
        return
    if as_json:
        sys.stdout.write(json.dumps(s) + "\n")
        return
    out.print(
        f"[bold]final accuracy {s['final_accuracy']:.4f}[/] after {s['rounds']} rounds "
        f"({s['algorithm']}, {s['dataset']}, {s['backend']}, {s['wall_s']:.1f} s)"
    )
    out.print(_upload_line(s))
    out.print(_phase_line(s))
    if "dp" in s:
        d = s["dp"]
        out.print(f"DP ({d['mode']}): epsilon {d['epsilon']:.3g} at delta {d['delta']:g}, noise "
                  f"multiplier {d['noise_multiplier']:.3g}, clip {d['clip']:g}")
    if "stopped" in s:
        err.print(f"[yellow]{s['stopped']}[/]")
    if "out" in s:
        out.print(f"history and plot written to {s['out']}")
    if "model_file" in s:
        out.print(f"model file (with its preprocessing) written to {s['model_file']}; score "
                  f"encrypted records with `hefl infer serve --model {s['model_file']} ...`"
                  + (f" and `hefl infer score --data {s['test_csv']} ...`"
                     if "test_csv" in s else ""))


def _upload_line(s: dict) -> str:
    how = f"encrypted, {s['he']}, custody {s['custody']}" if s["he"] != "none" else "plaintext"
    note = (f"; {s['he_workers']} processes handed the ciphertexts over in memory, so these are "
            "the bytes a real upload would carry, from sample ciphertexts' sizes"
            if s.get("upload_bytes_estimated") else "")
    return (f"upload per client and round: {s['upload_bytes_per_param']:.2f} bytes/parameter, "
            f"{s['upload_bytes_per_param'] / 4:.2f}x float32 ({how}; {s['params']} parameters)"
            + note)


def _phase_line(s: dict) -> str:
    """Where a median round's time goes (encode: all sampled clients, one after the other)."""
    parts = [f"{name} {s[f'median_{k}']:.3f} s" for name, k in
             (("encode", "encode_s"), ("aggregate", "aggregate_s"), ("decode", "decode_s"))
             if s.get(f"median_{k}") is not None]
    return f"median round {s['median_wall_s']:.3f} s: " + ", ".join(parts)


def _title(o: SimulateOptions, algorithm: str, clients: int, per_round: int) -> str:
    enc = f"{o.he}, custody {o.custody}" if o.he else "plaintext"
    dp = f", DP {o.privacy.mode}" if o.privacy is not None else ""
    data = o.csv.name if o.csv is not None else o.dataset
    return f"{data}: {algorithm}, {enc}{dp}, {per_round} of {clients} clients per round"


def _print_round(record) -> None:
    m = record.metrics
    out.print(
        f"round {record.round:3d}  clients {record.contributors:3d}/{record.selected:<3d} "
        f"train loss {record.train_loss or float('nan'):.3f}  test loss {m['test_loss']:.3f}  "
        f"test accuracy {m['test_accuracy']:.3f}  ({record.wall_s * 1000:.0f} ms)"
    )


@app.command()
def demo(
    rounds: int = typer.Option(40),
    epochs: int = typer.Option(5, help="local epochs"),
    he: str = typer.Option("bfv", help="HE scheme for the updates ('none' = plaintext)"),
) -> None:
    """The README's demo: digits across 100 clients, label skew, encrypted updates.

    Digits is bundled with scikit-learn; clients get a Dirichlet(0.5) label skew; updates are
    encrypted with BFV unless --he none."""
    scheme = None if he.lower() == "none" else he
    out.print(
        "[bold]hefl demo[/]: digits across 100 clients (Dirichlet 0.5 label skew), 10 clients per "
        f"round, FedAvg, {epochs} local epochs, "
        + (f"updates encrypted ({scheme})" if scheme else "plaintext updates")
    )
    opts = SimulateOptions(rounds=rounds, epochs=epochs, he=scheme)
    try:
        s = run_simulation(opts, on_round=_print_round)
    except HeflError as e:
        _fail(e)
        return
    out.print(_upload_line(s))
    if scheme:
        out.print(
            "  (a model this small leaves part of its ciphertexts empty; at 1 M parameters the "
            "bfv upload is 1.7x float32: see BENCHMARKS.md, W4)"
        )
    out.print(f"[bold green]final accuracy: {s['final_accuracy']:.4f}[/]")
