"""muestra: sample language models many times under exact control and measure what comes out.

The package is layered (see ../shared/DESIGN.md): model loading and the offline
model kit at the bottom, the token-id decoding engine above them, and the CLI on
top. Everything users can call from a notebook is re-exported here.
"""

__version__ = "0.1.0"

from muestra.errors import (  # noqa: E402
    InputError,
    ModelNotFoundError,
    MuestraError,
    UnsafeModelError,
)


def run(*args, **kwargs):  # noqa: ANN002, ANN003
    """Run (or resume) an experiment spec: see `muestra.experiments.run`."""
    from muestra.experiments import run as run_experiment

    return run_experiment(*args, **kwargs)


__all__ = [
    "run",
    "__version__",
    "InputError",
    "ModelNotFoundError",
    "MuestraError",
    "UnsafeModelError",
]
