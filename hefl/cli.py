"""The ``hefl`` command line (typer + rich).

hefl simulate [options]     federated training simulated on this machine
hefl demo                   the README's demo: digits across 100 clients
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from hefl.errors import HeflError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="hefl: federated learning with encrypted aggregation, and encrypted inference.",
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

DATASETS = ("digits",)


def _fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(2)


def _simulate(
    dataset: str,
    partition: str,
    alpha: float,
    clients: int,
    per_round: int,
    rounds: int,
    algorithm: str,
    client_lr: float,
    server_lr: float | None,
    mu: float | None,
    epochs: int,
    batch_size: int,
    seed: int,
    threads: int,
    he: str | None,
    as_json: bool,
    out_dir: Path | None,
    progress: bool,
    on_round=None,
) -> dict:
    from hefl import workloads
    from hefl.algorithms import make_algorithm
    from hefl.errors import ConfigError
    from hefl.simulation import simulate

    t0 = time.perf_counter()
    workloads.seed_everything_for_torch(threads)
    if dataset != "digits":
        raise ConfigError(f"unknown data set {dataset!r}; choose one of: {', '.join(DATASETS)}")
    algo = make_algorithm(
        algorithm,
        client_lr=client_lr,
        server_lr=server_lr,
        mu=mu,
        epochs=epochs,
        batch_size=batch_size,
    )
    wl = workloads.digits(num_clients=clients, partition=partition, alpha=alpha, seed=seed)
    aggregator = None
    if he:
        from hefl.crypto import make_aggregator  # type: ignore[attr-defined]

        aggregator = make_aggregator(he, wl.model.spec.size)
    result = simulate(
        wl.model,
        wl.data,
        algo,
        rounds=rounds,
        clients_per_round=per_round,
        seed=seed,
        test=wl.test,
        aggregator=aggregator,
        progress=progress and not as_json,
        on_round=on_round,
    )
    summary = {
        "dataset": dataset,
        "algorithm": algo.name,
        "clients": clients,
        "clients_per_round": per_round,
        "he": he or "none",
        **workloads.summary(result),
        "params": int(wl.model.spec.size),
        "upload_bytes_per_param": (
            workloads.summary(result)["mean_upload_bytes"]
            / max(1, per_round if per_round < clients else clients)
            / wl.model.spec.size
        ),
        "wall_s": time.perf_counter() - t0,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.history.to_jsonl(out_dir / "history.jsonl")
        result.history.to_csv(out_dir / "history.csv")
        result.history.plot(out_dir / "history.png", title=f"{dataset} {algo.name}")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["out"] = str(out_dir)
    return summary


@app.command()
def simulate(
    dataset: str = typer.Option("digits", help="data set: " + ", ".join(DATASETS)),
    partition: str = typer.Option("dirichlet", help="dirichlet or iid"),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more skew)"),
    clients: int = typer.Option(100, help="number of clients"),
    clients_per_round: int = typer.Option(10, "--clients-per-round", "-k"),
    rounds: int = typer.Option(20),
    algorithm: str = typer.Option(
        "fedavg", help="fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad"
    ),
    client_lr: float = typer.Option(0.05),
    server_lr: float | None = typer.Option(None, help="server learning rate (FedOpt/FedAvgM)"),
    mu: float | None = typer.Option(None, help="FedProx proximal coefficient"),
    epochs: int = typer.Option(1, help="local epochs"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch intra-op threads"),
    he: str | None = typer.Option(None, help="encrypt client updates with this HE scheme"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON summary"),
    out_dir: Path | None = typer.Option(
        None, "--out", help="write history (jsonl, csv) and a plot"
    ),
) -> None:
    """Simulate federated training on this machine."""
    try:
        s = _simulate(
            dataset,
            partition,
            alpha,
            clients,
            clients_per_round,
            rounds,
            algorithm,
            client_lr,
            server_lr,
            mu,
            epochs,
            batch_size,
            seed,
            threads,
            he,
            as_json,
            out_dir,
            progress=True,
        )
    except HeflError as e:
        _fail(e)
        return
    if as_json:
        sys.stdout.write(json.dumps(s) + "\n")
    else:
        out.print(
            f"[bold]final accuracy {s['final_accuracy']:.4f}[/] after {s['rounds']} rounds "
            f"({s['algorithm']}, {s['clients']} clients, {s['wall_s']:.1f} s)"
        )
        if "out" in s:
            out.print(f"history and plot written to {s['out']}")


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
    he: str | None = typer.Option(None, help="HE scheme for encrypted aggregation"),
) -> None:
    """Digits (bundled with scikit-learn) across 100 clients, Dirichlet(0.5) label skew."""
    out.print(
        "[bold]hefl demo[/]: digits across 100 clients (Dirichlet 0.5 label skew), "
        f"10 clients per round, FedAvg, {epochs} local epochs"
    )
    try:
        s = _simulate(
            "digits",
            "dirichlet",
            0.5,
            100,
            10,
            rounds,
            "fedavg",
            0.05,
            None,
            None,
            epochs,
            32,
            0,
            1,
            he,
            False,
            None,
            progress=False,
            on_round=_print_round,
        )
    except HeflError as e:
        _fail(e)
        return
    out.print(
        f"upload per client-round: {s['upload_bytes_per_param']:.2f} bytes/parameter "
        f"({'encrypted ' + s['he'] if he else 'plaintext'}; float32 is 4.00)"
    )
    out.print(f"[bold green]final accuracy: {s['final_accuracy']:.4f}[/]")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
