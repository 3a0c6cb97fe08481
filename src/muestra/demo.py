"""`make demo`: build the offline kit and show muestra's commands on it.

Runs the same commands a user would type, in-process, and prints each one first.
The kit's weights are random, so the words it generates are meaningless; the tokens,
ids, template, probabilities and speed are all real.
"""

from __future__ import annotations

import argparse
import shlex
from importlib import resources
from pathlib import Path

from rich.console import Console

console = Console(highlight=False)


def run(*args: str) -> None:
    from muestra.cli.app import app

    console.print(f"\n[bold cyan]$ muestra {shlex.join(args)}[/]")
    try:
        app(list(args), prog_name="muestra", standalone_mode=False)
    except SystemExit as done:  # commands may exit 0 explicitly
        assert not done.code, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kit-dir", type=Path, default=None, help="Folder for kit models.")
    args = parser.parse_args()
    from muestra.models.kit import ensure_kit

    kit_root = args.kit_dir.expanduser() if args.kit_dir else None
    console.print("[bold]muestra demo[/] — building the offline kit (random weights) …")
    tiny = ensure_kit("tiny", kit_root / "tiny" if kit_root else None)
    console.print(f"kit model: {tiny}")
    console.print(
        "[yellow]The kit's weights are RANDOM: what it generates is meaningless. "
        "Pass a real model (Hub id or folder) to study a model.[/]"
    )
    messages = Path(str(resources.files("muestra") / "data" / "strawberry.json"))
    model = str(tiny)
    run("tokens", model, "Lista de colores: rojo, azul")
    run("chat", model, "--messages", str(messages))
    run("next", model, "¿De qué color es el cielo?", "--top", "8")
    generate = ["--prompt", "Genera un personaje de rol.", "--n", "3", "--seed", "1234"]
    sampling = ["--temperature", "0.6", "--top-p", "0.95", "--top-k", "20"]
    run("generate", model, *generate, *sampling, "--max-new-tokens", "16")

    examples = Path(str(resources.files("muestra") / "data"))
    store = (kit_root or tiny.parent) / "personajes-demo.db"
    for leftover in store.parent.glob(store.name + "*"):
        leftover.unlink()
    console.print(
        "\n[bold]Seed 000's experiment[/] (examples/personajes.toml) on the kit model, "
        "4 samples per prompt instead of 50:"
    )
    spec = str(examples / "personajes.toml")
    run("run", spec, "--model", model, "--samples", "4", "--out", str(store))
    run("summary", str(store))
    run("analyze", str(store))
    report = store.with_suffix(".html")
    run("report", str(store), "-o", str(report))
    console.print(f"open {report} in a browser: it works offline")
    console.print(
        "[yellow]These numbers come from RANDOM weights and mean nothing; with "
        "Qwen/Qwen3-4B-Thinking-2507 the same spec reproduces seed 000's experiment.[/]"
    )


if __name__ == "__main__":
    main()
