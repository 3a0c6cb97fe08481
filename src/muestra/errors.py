"""Errors a user can cause, each with a message that says what to do next.

Every error a user can hit is a `MuestraError`. Its message names the file,
field or value at fault and ends with the fix. The CLI turns any of them into
one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class MuestraError(Exception):
    """Base class of every error a user can cause and fix."""

    exit_code = 2


class InputError(MuestraError):
    """A bad value in a file, a flag or an argument."""


class ModelNotFoundError(MuestraError):
    """A model path that does not exist, or a Hub id that cannot be reached."""


class ModelLoadError(MuestraError):
    """A model whose files are there but do not load (damaged weights, missing code)."""


class UnsafeModelError(MuestraError):
    """A model whose loading would run untrusted code (pickle or remote code)."""


class ContextLengthError(InputError):
    """Prompt plus requested new tokens exceed what the model can attend to."""


class MemoryBudgetError(InputError):
    """A run whose model and rows cannot fit the memory budget, refused before it loads."""


class StoreError(InputError):
    """An experiment store that cannot be used as asked: damaged, written by a newer
    muestra, read-only when it must be written, or in use by another run."""


class Interrupted(MuestraError):
    """Ctrl-C (SIGINT) during work that cleans up after itself: the message says what was
    kept and what was not."""

    exit_code = 130
