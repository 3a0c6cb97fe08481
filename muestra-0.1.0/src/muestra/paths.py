"""Where muestra keeps files of its own: `$MUESTRA_CACHE`, else the user cache."""

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
