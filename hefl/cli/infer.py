"""``hefl infer``: serve a model, score a CSV under encryption, benchmark on any CSV.

    hefl infer serve --model model.json --self-signed certs/         # model owner
    hefl infer score --data new.csv --out scores.csv --ca certs/cert.pem   # data owner
    hefl infer bench --csv data.csv --target y [--sep ;] [--json] [--save-model model.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from hefl.errors import HeflError

OUT = Path("scores.csv")
app = typer.Typer(help="Encrypted batch inference (CKKS): serve, score, bench.",
                  no_args_is_help=True)


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


@app.command()
def serve(
    model: Annotated[Path, typer.Option(help="model file (JSON, with preprocessing)")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free port)")] = 8443,
    cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    profile: Annotated[str, typer.Option(help="CKKS parameters: precise or fast (LR)")] = "precise",
    self_signed: Annotated[
        Path | None, typer.Option(help="write a self-signed cert.pem/key.pem here (local test)")
    ] = None,
) -> None:
    """Model owner: evaluate data owners' encrypted batches over HTTPS; holds no secret key."""
    from hefl.inference.model import ModelFile
    from hefl.inference.service import ScoringService, make_server, serve_forever

    try:
        if self_signed is not None:
            from hefl.inference.tls import self_signed as make_cert

            cert, key = make_cert(self_signed, hostname=host if host != "0.0.0.0" else "localhost")
        if cert is None or key is None:
            raise HeflError("give --cert and --key, or --self-signed DIR for a local test "
                            "certificate")
        service = ScoringService(ModelFile.load(model), profile=profile)
        server = make_server(service, cert, key, host, port,
                             log=lambda m: typer.echo(m, err=True))
    except (HeflError, OSError) as e:
        raise _fail(e) from e
    info = service.info()
    typer.echo(f"serving {info['kind']} ({info['n_features']} features, "
               f"{info['records_per_batch']} records/batch) on "
               f"https://{host}:{server.server_address[1]}  certificate: {cert}", err=True)
    serve_forever(server)


@app.command()
def score(
    data: Annotated[Path, typer.Option(help="CSV of records (training columns)")],
    out: Annotated[Path, typer.Option(help="scores CSV: row,logit,probability")] = OUT,
    url: Annotated[str, typer.Option(help="scoring server")] = "https://127.0.0.1:8443",
    ca: Annotated[Path | None, typer.Option(help="certificate to trust (server cert.pem)")] = None,
    sep: Annotated[str, typer.Option(help="CSV separator")] = ",",
    batch_size: Annotated[int | None, typer.Option(help="records per batch (default: a full "
                                                     "ciphertext)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted --out")] = False,
) -> None:
    """Data owner: encrypt records locally, have the server score them, decrypt, write CSV."""
    from hefl.inference.service import ScoringClient, score_csv

    try:
        s = score_csv(ScoringClient(url, ca), data, out, sep=sep, batch_size=batch_size,
                      resume=resume)
    except HeflError as e:
        raise _fail(e) from e
    for col, n in s.unknown_categories.items():
        typer.echo(f"warning: {n} values of {col!r} were not seen in training; scored as the "
                   "all-zeros one-hot", err=True)
    typer.echo(f"scored {s.scored} rows in {s.batches} batches ({s.seconds:.1f} s) -> {out}"
               + (f" (resumed after {s.skipped})" if s.skipped else ""), err=True)


@app.command()
def bench(
    csv: Annotated[Path, typer.Option(help="CSV file with a header (or --no-header)")],
    target: Annotated[str, typer.Option(help="binary target column")],
    sep: Annotated[str, typer.Option(help="separator (' ' splits on runs of spaces)")] = ",",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    positive: Annotated[str | None, typer.Option(help="label of the positive class")] = None,
    no_header: Annotated[bool, typer.Option(
        "--no-header", help="the file has no header line: columns are named c1, c2, ...")] = False,
    drop: Annotated[list[str] | None, typer.Option(help="column to leave out (repeat)")] = None,
    save_model: Annotated[Path | None, typer.Option(help="also write the model file")] = None,
    profile: Annotated[str, typer.Option(help="CKKS parameters: precise or fast")] = "precise",
) -> None:
    """Logistic regression on a stratified 80/20 split (seed 0), test split scored encrypted."""
    from hefl.data.tabular import read_csv
    from hefl.inference.bench import BENCH_KEYS, bench_table

    try:
        table = read_csv(csv, sep=sep, drop=drop or (), no_header=no_header)
        res = bench_table(table, target, positive=positive, save_model=save_model,
                          profile=profile)
    except HeflError as e:
        raise _fail(e) from e
    if json_out:
        typer.echo(json.dumps({k: res[k] for k in BENCH_KEYS}))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("metric", "value", title=f"encrypted logistic regression: {csv.name}")
    for k in BENCH_KEYS:
        v = res[k]
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(file=sys.stdout).print(t)
