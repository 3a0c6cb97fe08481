"""Where muestra keeps files of its own (`$MUESTRA_CACHE`, else the user cache), and where
a command puts a store it is not told about (`default_store`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MUESTRA_CACHE`, else `$XDG_CACHE_HOME/muestra`, else `~/.cache/muestra`."""
    if explicit := os.environ.get("MUESTRA_CACHE"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "muestra"


def default_kit_dir(preset: str) -> Path:
    return cache_dir() / "kit" / preset


def default_store(name: str, kind: str | None = None, beside: Path | None = None) -> Path:
    """The store a command writes when not given `--out` (the Python API the same):
    `NAME.db` — `KIND-NAME.db` for `eval` and `compare` — in the current folder, or in
    `beside`'s folder (an experiment spec's)."""
    file = f"{kind}-{name}.db" if kind else f"{name}.db"
    return beside.with_name(file) if beside is not None else Path(file)
