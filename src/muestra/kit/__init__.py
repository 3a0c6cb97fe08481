"""The offline model kit: the real Qwen3 tokenizer and random-weight models."""

from muestra.kit.build import build_kit, ensure_kit
from muestra.kit.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "build_kit", "ensure_kit", "get_preset"]
