"""`muestra` entry point: the Typer app, `--version`, and error handling.

Any `MuestraError` becomes one line on stderr (`error: …`) and exit code 2;
Typer's own usage errors also exit 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from muestra.cli import (
    align_cmd,
    analyze_cmd,
    compare_cmd,
    eval_cmd,
    experiment_cmd,
    generate_cmd,
    inspect_cmd,
    kit_cmd,
    probe_cmd,
    serve_cmd,
)
from muestra.errors import MuestraError
from muestra.version import __version__

app = typer.Typer(
    name="muestra",
    help="Sample language models many times under exact control and measure what comes out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"muestra {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Sample language models many times under exact control and measure what comes out.

    MODEL arguments take a Hub id (e.g. Qwen/Qwen3-4B-Thinking-2507) or a local folder,
    such as one written by `muestra kit build` (random weights, for offline use).
    """


app.add_typer(kit_cmd.app, name="kit")
inspect_cmd.register(app)
generate_cmd.register(app)
experiment_cmd.register(app)
analyze_cmd.register(app)
serve_cmd.register(app)
eval_cmd.register(app)
compare_cmd.register(app)
align_cmd.register(app)
probe_cmd.register(app)


def main() -> None:
    try:
        app(prog_name="muestra")  # standalone: usage errors print themselves and exit 2
    except MuestraError as err:
        message = f"[bold red]error:[/] {escape(str(err))}"
        Console(stderr=True).print(message, highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
