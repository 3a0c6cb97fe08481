"""`muestra generate` (filled in by the decoding engine)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    return None
