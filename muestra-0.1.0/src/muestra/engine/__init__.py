"""The decoding engine: token ids in, token ids out (see `engine.py`)."""

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
