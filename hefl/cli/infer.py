"""``hefl infer``: serve a model, score a CSV under encryption, benchmark on any CSV.

    hefl certs --out certs --clients bank-a                            # model owner, once
    hefl infer serve --model model.json --clients certs/clients.toml \
                     --cert certs/server.pem --key certs/server.key --client-ca certs/ca.pem
    hefl infer export-preprocessing --model model.json --out pre.json  # give to bank-a
    hefl infer score --data new.csv --token-file bank-a.token --ca ca.pem \
                     --cert bank-a.pem --key bank-a.key --preprocessing pre.json   # data owner
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
    clients: Annotated[Path | None, typer.Option(
        help="callers file: who may score, token SHA-256, budgets (hefl certs writes "
             "certs/clients.toml)")] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free port)")] = 8443,
    cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM), e.g. "
                                              "certs/server.pem")] = None,
    key: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    client_ca: Annotated[Path | None, typer.Option(
        help="require client certificates from this CA (mTLS), e.g. certs/ca.pem")] = None,
    records_per_day: Annotated[int, typer.Option(
        help="records a caller may score per UTC day, unless its entry sets its own")
    ] = 1_000_000,
    requests_per_minute: Annotated[int, typer.Option(
        help="requests a caller may make per minute, unless its entry sets its own")] = 120,
    usage_log: Annotated[Path | None, typer.Option(
        help="ledger of scored records and refusals (default: usage.jsonl beside --clients)")
    ] = None,
    evaluations: Annotated[int, typer.Option(help="batches evaluated at once")] = 2,
    workers: Annotated[int, typer.Option(
        help="processes that share each logistic-regression batch (this one included); each "
             "session starts workers - 1 helpers when it opens")] = 1,
    publish_preprocessing: Annotated[bool, typer.Option(
        "--publish-preprocessing",
        help="let callers fetch the training means and standard deviations from /v1/model "
             "(by default they get feature names only, and the preprocessing file from you)")
    ] = False,
    profile: Annotated[str, typer.Option(help="CKKS parameters: precise or fast (LR)")] = "precise",
    self_signed: Annotated[
        Path | None, typer.Option(help="write a self-signed cert.pem/key.pem here (local test)")
    ] = None,
) -> None:
    """Model owner: evaluate data owners' encrypted batches over HTTPS; holds no secret key.
    Every caller is authenticated by its token and held to its budget."""
    from hefl.inference.callers import Budget, Quotas
    from hefl.inference.model import ModelFile
    from hefl.inference.server import Limits, make_server, serve_forever
    from hefl.inference.service import ScoringService

    try:
        if clients is None:
            raise HeflError("give --clients FILE: the callers who may score (`hefl certs --out "
                            "certs --clients NAME` writes certs/clients.toml and each "
                            "caller's token)")
        if self_signed is not None:
            from hefl.inference.tls import self_signed as make_cert

            cert, key = make_cert(self_signed, hostname=host if host != "0.0.0.0" else "localhost")
        if cert is None or key is None:
            raise HeflError("give --cert and --key, or --self-signed DIR for a local test "
                            "certificate")
        service = ScoringService(ModelFile.load(model), profile=profile,
                                 publish_preprocessing=publish_preprocessing, workers=workers)
        quotas = Quotas(Budget(records_per_day, requests_per_minute),
                        ledger=usage_log or clients.parent / "usage.jsonl")
        server = make_server(service, cert, key, clients, host, port, quotas=quotas,
                             client_ca=client_ca, limits=Limits(evaluations=evaluations),
                             log=lambda m: typer.echo(m, err=True))
    except (HeflError, OSError) as e:
        raise _fail(e) from e
    info = service.info()
    typer.echo(f"serving {info['kind']} ({info['n_features']} features, "
               f"{info['records_per_batch']} records/batch) on "
               f"https://{host}:{server.server_address[1]} to "
               f"{len(server.callers.callers)} callers{' (mTLS)' if client_ca else ''}; "
               f"certificate: {cert}; usage: {quotas.ledger}", err=True)
    try:
        serve_forever(server)
    finally:
        service.close()


@app.command()
def score(
    data: Annotated[Path, typer.Option(help="CSV of records (training columns)")],
    token_file: Annotated[Path | None, typer.Option(
        help="your token from the model owner (hefl certs: certs/clients/NAME.token)")] = None,
    out: Annotated[Path, typer.Option(help="scores CSV: row,logit,probability")] = OUT,
    url: Annotated[str, typer.Option(help="scoring server")] = "https://127.0.0.1:8443",
    ca: Annotated[Path | None, typer.Option(
        help="certificate to trust: the CA's ca.pem, or a self-signed server's cert.pem")] = None,
    cert: Annotated[Path | None, typer.Option(help="your client certificate (mTLS)")] = None,
    key: Annotated[Path | None, typer.Option(help="your client certificate's key")] = None,
    preprocessing: Annotated[Path | None, typer.Option(
        help="the model's preprocessing file from the model owner (hefl infer "
             "export-preprocessing); not needed if the server publishes it")] = None,
    sep: Annotated[str | None, typer.Option(
        help="CSV separator (default: the model's training file's, else sniffed)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="records per batch (default: a full "
                                                     "ciphertext)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted --out")] = False,
    workers: Annotated[int, typer.Option(
        help="processes that share the encryption (this one included)")] = 1,
) -> None:
    """Data owner: encrypt records locally, have the server score them, decrypt, write CSV."""
    from hefl.inference.service import ScoringClient, score_csv

    try:
        if token_file is None:
            raise HeflError("give --token-file FILE: the token the model owner issued you")
        client = ScoringClient(url, ca, token_file=token_file, cert=cert, key=key)
        s = score_csv(client, data, out, sep=sep, batch_size=batch_size, resume=resume,
                      preprocessing=preprocessing, workers=workers)
    except HeflError as e:
        raise _fail(e) from e
    for col, n in s.unknown_categories.items():
        typer.echo(f"warning: {n} values of {col!r} were not seen in training; scored as the "
                   "all-zeros one-hot", err=True)
    typer.echo(f"scored {s.scored} rows in {s.batches} batches ({s.seconds:.1f} s) -> {out}"
               + (f" (resumed after {s.skipped})" if s.skipped else ""), err=True)
    if s.accuracy is not None:
        typer.echo(f"accuracy of the decrypted scores on the {s.rows} labelled rows: "
                   f"{s.accuracy:.4f} (logit > 0 is class 1)", err=True)


@app.command("export-preprocessing")
def export_preprocessing(
    model: Annotated[Path, typer.Option(help="model file (JSON, with preprocessing)")],
    out: Annotated[Path, typer.Option(help="preprocessing file to give the data owners")],
) -> None:
    """Model owner: write the model's preprocessing (feature names, categories, training
    means and standard deviations; no weights) for data owners to pass to `score`."""
    from hefl.inference.model import ModelFile

    try:
        pre = ModelFile.load(model).preprocessing
        if pre is None:
            raise HeflError(f"{model} has no preprocessing; its callers send preprocessed "
                            "features")
    except HeflError as e:
        raise _fail(e) from e
    out.write_text(json.dumps(pre.to_dict(), indent=1))
    typer.echo(f"wrote {out} ({pre.n_features} features); give it to data owners with their "
               "token", err=True)


@app.command()
def bench(
    csv: Annotated[Path, typer.Option(help="CSV file with a header (or --no-header)")],
    target: Annotated[str, typer.Option(help="binary target column")],
    sep: Annotated[str | None, typer.Option(
        help="separator (default: sniffed; ' ' splits on runs of spaces)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    positive: Annotated[str | None, typer.Option(help="label of the positive class")] = None,
    no_header: Annotated[bool, typer.Option(
        "--no-header", help="the file has no header line: columns are named c1, c2, ...")] = False,
    drop: Annotated[list[str] | None, typer.Option(help="column to leave out (repeat)")] = None,
    save_model: Annotated[Path | None, typer.Option(help="also write the model file")] = None,
    profile: Annotated[str, typer.Option(help="CKKS parameters: precise or fast")] = "precise",
    workers: Annotated[int, typer.Option(
        help="processes per side (data owner and model owner), this one included")] = 1,
) -> None:
    """Logistic regression on a stratified 80/20 split (seed 0), test split scored encrypted."""
    from hefl.data.tabular import read_csv
    from hefl.inference.bench import BENCH_KEYS, bench_table

    try:
        table = read_csv(csv, sep=sep, drop=drop or (), no_header=no_header)
        res = bench_table(table, target, positive=positive, save_model=save_model,
                          profile=profile, workers=workers)
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
