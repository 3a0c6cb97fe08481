"""`muestra kit build`: write an offline stand-in model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from muestra.models.kit.presets import PRESETS

PRESET_HELP = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())

app = typer.Typer(
    help="The offline model kit: the real Qwen3 tokenizer with RANDOM-WEIGHT models of real "
    "architectures, for using and testing muestra without a model hub. What these models "
    "say is meaningless.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@app.command("build")
def build(
    preset: str = typer.Option("tiny", "--preset", help=f"Which model to build. {PRESET_HELP}"),
    out: Path | None = typer.Option(
        None, "--out", help="Folder to write (default: ~/.cache/muestra/kit/PRESET)."
    ),
) -> None:
    """Build a kit folder with RANDOM weights (same bytes for the same preset).

    The folder loads like any downloaded model: pass it as MODEL to every command.
    """
    from muestra.models.kit import build_kit

    folder = build_kit(preset, out)
    typer.echo(str(folder))
