"""The ``hefl`` command line (typer + rich): one app; every command is registered here.

    hefl simulate | demo                                   hefl.cli.simulate
    hefl server | client | certs | keys | status | split-data   hefl.cli.net
    hefl infer serve | score | bench                       hefl.cli.infer

``python -m hefl.cli ...`` runs the same app (the test suite spawns servers and clients so).
"""

from __future__ import annotations

import sys

import typer
import typer.core

from hefl.cli import infer, net, simulate
from hefl.tuning import reuse_freed_memory, small_pages

_value_type = typer.core.TyperOption.display_type_rich


def _flag_has_no_type(self, ctx):
    """Help shows a type only for options that take a value: ``--json``, not ``--json <bool>``."""
    return None if self.is_flag else _value_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_has_no_type  # type: ignore[method-assign]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="hefl: federated learning with encrypted aggregation, and encrypted inference.",
)


def _version(value: bool) -> None:
    if value:
        from hefl import __version__

        typer.echo(f"hefl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print hefl's version and exit"),
) -> None:
    """hefl: federated learning with encrypted aggregation, and encrypted inference."""
    small_pages()  # a round's fresh model-sized arrays fault in 4 KiB pages (hefl.tuning)
    reuse_freed_memory()  # ... and are reused, not mapped afresh each time (hefl.tuning)
app.registered_commands.extend(simulate.app.registered_commands)
app.registered_commands.extend(net.app.registered_commands)
app.add_typer(infer.app, name="infer")

# Commands that run gRPC servers or channels end through hefl.cli.net.run_process.
_GRPC_COMMANDS = {"server", "client"}


def main() -> None:  # pragma: no cover - console entry (`hefl`)
    if len(sys.argv) > 1 and sys.argv[1] in _GRPC_COMMANDS:
        net.run_process(app)
    app()


__all__ = ["app", "main"]
