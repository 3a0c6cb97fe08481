"""Options and printing helpers shared by the commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

MODEL_HELP = (
    "Hub id (e.g. Qwen/Qwen3-4B-Thinking-2507) or local folder (e.g. one written by "
    "`muestra kit build`)."
)

JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")
DtypeOption = typer.Option(
    "auto", "--dtype", help="auto (as saved) | bfloat16 | float16 | float32."
)
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda.")
AllowPickleOption = typer.Option(
    False, "--allow-pickle", help="Allow pickle (.bin) weights, which can run arbitrary code."
)
TrustRemoteCodeOption = typer.Option(
    False, "--trust-remote-code", help="Run modelling code shipped with the model."
)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def visible(text: str) -> str:
    """Text with control characters shown as escapes, for one table cell."""
    return json.dumps(text, ensure_ascii=False)[1:-1]
