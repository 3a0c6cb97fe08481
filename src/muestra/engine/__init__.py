"""The decoding engine: token ids in, token ids out (see `engine.py`).

The names below load on first use (PEP 562): a torch-free module of this package
(`engine.progress`) can be imported without importing torch, so commands still refuse
bad input before torch loads (tests/test_early_refusals.py)."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from muestra.engine.engine import Engine
    from muestra.engine.rows import (
        GenerationRequest,
        NoHook,
        Row,
        Sample,
        StepEvent,
        StepHook,
        TokenEvent,
        TokenLogprobs,
    )
    from muestra.engine.sampling import SamplingParams
    from muestra.engine.seeds import sample_seed

_WHERE = {
    "Engine": "engine",
    "GenerationRequest": "rows",
    "NoHook": "rows",
    "Row": "rows",
    "Sample": "rows",
    "StepEvent": "rows",
    "StepHook": "rows",
    "TokenEvent": "rows",
    "TokenLogprobs": "rows",
    "SamplingParams": "sampling",
    "sample_seed": "seeds",
}

__all__ = [
    "Engine",
    "GenerationRequest",
    "NoHook",
    "Row",
    "Sample",
    "SamplingParams",
    "StepEvent",
    "StepHook",
    "TokenEvent",
    "TokenLogprobs",
    "sample_seed",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'muestra.engine' has no attribute {name!r}")
    value = getattr(import_module(f"muestra.engine.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
