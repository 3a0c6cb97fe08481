"""The runtime seam: what the engine asks of whatever computes logits.

A `Runtime` is one loaded model behind one computing library: `torch` (a transformers
model, `torch_runtime.py`) or `llamacpp` (a GGUF file, `llamacpp_runtime.py`). Everything
above the logits (sampling, seeds, hooks, grammars, `field_probs`, beams, drafts, echo)
is written once against these two small interfaces:

- `Runtime.prefill(prompts)` puts each prompt in a row of a new `Sequences` and returns
  the logits after it;
- `Sequences` is the KV state of a batch of rows, each row one token sequence with its
  own positions. `feed` appends each row its own tokens (ragged: jump-forward drafts,
  prompt-lookup and speculative rounds) and returns the logits after the fed tokens;
  `select` keeps, reorders or copies rows (rows leaving, beams forking); `crop` forgets
  a row's last positions (rejected drafts); `clone` copies rows into an independent
  `Sequences`; `merge` takes another batch's rows (continuous batching); `context`
  keeps a row's first positions alive after the row leaves (exact answer
  probabilities), and `Runtime.resume` starts new rows from the first positions of such
  contexts.

Logits are float32 torch tensors `(rows, V)` with `V = Runtime.vocab_size`, on the
runtime's device. What a runtime cannot compute is refused by name before any work:
`supports_dola` (premature layers' hidden states).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # only named in annotations: checking a model path imports no torch
    import torch

# The cancellation of the request a computation serves: `muestra serve` sets an event here
# before it hands a beam search or a drafted request to a worker thread (`asyncio.to_thread`
# copies the context), and every `prefill` and `feed` in that thread checks it, so a client
# that leaves stops the search at its next step. Unset (the scheduler's thread, a local
# run), nothing is ever cancelled.
CANCEL: ContextVar[threading.Event | None] = ContextVar("muestra_cancel", default=None)


class Cancelled(Exception):  # noqa: N818 (a state, not a failure)
    """The request this computation serves was cancelled: its client went away."""


def check_cancelled() -> None:
    event = CANCEL.get()
    if event is not None and event.is_set():
        raise Cancelled("the client went away")


RuntimeName = Literal["torch", "llamacpp"]
LogitsWanted = Literal["last", "all"]


@dataclass
class Fed:
    """The logits after a `feed` (or a `prefill`).

    `last[i]` (V,) follows row `i`'s last fed token (undefined for a row fed nothing);
    with `logits="all"`, `ahead[i]` (n_i, V) follows each of its `n_i` fed tokens.
    `premature` (DoLa): layer → (rows, V), the output head on that layer's last position.
    """

    last: torch.Tensor
    ahead: list[torch.Tensor] | None = None
    premature: dict[int, torch.Tensor] = field(default_factory=dict)


class Context(Protocol):
    """A row's first `length` positions, alive after the row left its batch."""

    length: int

    def release(self) -> None: ...


class Sequences(Protocol):
    """The KV state of a batch of rows (see the module docstring)."""

    lengths: list[int]  # positions held by each row (its next position)
    pads_ragged: bool  # whether a ragged feed pays for padding (torch) or not (llama.cpp)

    def __len__(self) -> int: ...

    def feed(
        self,
        tokens: Sequence[Sequence[int]],
        logits: LogitsWanted = "last",
        layers: frozenset[int] = frozenset(),
    ) -> Fed: ...

    def select(self, index: Sequence[int], trim: bool = True) -> None: ...

    def crop(self, row: int, length: int) -> None: ...

    def clone(self, rows: Sequence[int]) -> Sequences: ...

    def merge(self, other: Sequences, room: int) -> None: ...

    @property
    def can_merge(self) -> bool: ...

    @property
    def can_crop(self) -> bool: ...

    def context(self, row: int, length: int) -> Context | None: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    """One loaded model behind one computing library."""

    name: RuntimeName
    vocab_size: int
    num_layers: int
    max_length: int | None
    device: torch.device
    supports_dola: bool
    weights_bytes: int  # the weights in memory
    model: Any  # the transformers model (torch), None (llamacpp)
    config: Any  # its transformers config (torch), None (llamacpp)

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        room: int,
        logits: LogitsWanted = "last",
        layers: frozenset[int] = frozenset(),
    ) -> tuple[Sequences, Fed]: ...

    def resume(self, contexts: Sequence[Context], lengths: Sequence[int]) -> Sequences: ...

    def info(self) -> dict[str, Any]: ...
