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

__all__ = [
    "__version__",
    "InputError",
    "ModelNotFoundError",
    "MuestraError",
    "UnsafeModelError",
]
