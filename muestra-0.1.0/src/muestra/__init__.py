"""muestra: sample language models many times under exact control and measure what comes out.

The package is layered (see ../shared/DESIGN.md), one folder per layer: `models/`
(loading, tokenizers, inspection, the kit), `engine/` (token-id decoding), `answers/`
(grammars, think → answer phases, generators), `analysis/` and `report/`,
`experiments/`, and the edges `cli/` and `server/`. The names a notebook needs are
re-exported here.
"""

from muestra.errors import (
    InputError,
    ModelNotFoundError,
    MuestraError,
    UnsafeModelError,
)
from muestra.version import __version__

# Names a notebook reaches for, loaded on first use (they import torch).
_LAZY = {
    "load_model": "muestra.models.loading",
    "ensure_kit": "muestra.models.kit.build",
    "build_kit": "muestra.models.kit.build",
    "TextGenerator": "muestra.answers.generation",
    "StructuredGenerator": "muestra.answers.structured",
    "sample_answers": "muestra.answers.structured",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'muestra' has no attribute {name!r}")


def run(*args, **kwargs):  # noqa: ANN002, ANN003
    """Run (or resume) an experiment spec: see `muestra.experiments.run`."""
    from muestra.experiments import run as run_experiment

    return run_experiment(*args, **kwargs)


__all__ = [
    "run",
    *_LAZY,
    "__version__",
    "InputError",
    "ModelNotFoundError",
    "MuestraError",
    "UnsafeModelError",
]
