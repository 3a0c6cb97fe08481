"""The llama.cpp runtime: a GGUF file computes the logits with llama.cpp's CPU kernels.

Through llama-cpp-python's low-level bindings (`llama_decode` on hand-built batches):
one llama.cpp context with one unified KV cache; every row is one llama.cpp sequence.
A prompt's rows share its cells (`llama_memory_seq_cp` tags the cells, nothing is
copied), beams fork the same way, a crop is `llama_memory_seq_rm` of a row's last
positions, and the logits of every token asked for are read at once from
`llama_get_logits` into one torch tensor (one copy, no loop over tokens).

**Batch invariance (`exact=True`, the default).** llama.cpp's CPU backend picks its
kernels by the shape of each micro-batch, and some of those choices change the bits of
a row's logits (found in ggml-cpu's source and measured, README "llama.cpp runtime"):

- flash attention takes a tiled path from 64 query tokens on, and a KV-split path
  (chunked by thread) for a micro-batch of one token once 512 cells are in use;
- llamafile's sgemm serves matrix products of two or more columns (Q8_0, Q4_0, F16
  weights), ggml's vec_dot one column; the last layer's products have one column per
  token whose logits are asked for;
- the tiled K-quant product (`GGML_CPU_TILED_MM`) from eight columns, and the
  AMX/repacked weight layouts ("extra buffer types");
- flash attention sums a query's cells in cell order: a row's new token placed in a
  cell freed by another row comes before its older cells.

So in exact mode every `llama_decode` holds 2 to 63 tokens, never exactly one of which
asks for logits (a one-token step gets a companion token on a scratch sequence; a lone
output gets a second one), flash attention is on, `GGML_CPU_TILED_MM=0`, no extra buffer
types, and no cell is reused while rows are alive (cells a row or a draft gives up stay
tagged by a scratch "graveyard" sequence until the cache is empty; a companion token's
cell is freed at once, being the last one taken, so the next token takes it in order).
Then a row's logits are bit-identical whatever rows share its batch, however its prompt
was chunked and whether its tokens came one at a time or as jump-forward drafts
(tests/test_llamacpp.py).

`exact=False` lets llama.cpp batch as it likes (512-token micro-batches, cells reused)
and turns flash attention off: its matrix-product attention sums over every cell of the
shared cache with SIMD lanes chosen by cell index, so a row's bits depend on where its
cells sit, but on this CPU it decodes 1.4x (one row) to 1.7x (32 rows, 400-token
prompt) faster than flash attention's cell-by-cell loop (README, "llama.cpp runtime").

**Booking the cache.** The cache has a fixed size while rows are alive, so the engine
books each row's whole budget (its prompt, once per request, + max_new_tokens + drafts)
when it admits the row, and gives it back when the row ends (`reserve(..., book=True)`,
`unbook`); the scheduler admits a waiting row only when its budget fits beside the
booked ones (`fits`), else the row waits. In exact mode the cells taken since the cache
was last empty count too, since none comes back while rows are alive: a row is admitted
only when its budget fits beside those and the running rows' whole budgets, so under
sustained load (a server that never idles) admissions pause until the running rows end
and the cache empties, and no cell is ever reused under a live row (`stats
["cells_reused"]` stays 0 unless a row takes more than its budget). The cache grows
(rebuilt, doubling) only when no row is alive — when a batch needs more, or when rows
had to wait for cells taken (so that those pauses become rarer; up to `DRAIN_ROOM`
times the cells the rows book together) — and never past `max_cells`: by default the
cells that half the memory available at load holds (`KV_SHARE`), with llama.cpp's
buffers beside them (`models.memory.LlamaBuffers`: without flash attention they grow with
the cells).
A request whose rows have no `max_tokens` books the model's remaining context per row,
so that budget bounds how many of its rows run at once; the others wait.

The AMX buffer type is off in both modes: in this llama.cpp build its matrix product
crashes (SIGSEGV in `ggml_backend_amx_mul_mat`) on this machine's Sapphire Rapids CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muestra.errors import ContextLengthError, InputError, ModelLoadError, MuestraError
from muestra.models.gguf_header import read_gguf_header
from muestra.models.memory import (
    DEFAULT_KV_CACHE,
    RUNTIME_KV_CACHES,
    MemoryUnknown,
    cells_within,
    llama_buffers_from_gguf,
)
from muestra.models.memory import KV_CACHE_TYPES as KV_CACHE_SIZES
from muestra.models.runtime.base import Fed, LogitsWanted, check_cancelled
from muestra.models.runtime.threads import thread_wait_now

INSTALL_HINT = (
    "the llama.cpp runtime needs llama-cpp-python: pip install 'muestra[llamacpp]' (pip "
    "builds it from source, ~5-10 min on 2 cores, once per machine; it needs cmake and a "
    "C++ compiler). Or pass --runtime torch to dequantize the GGUF into a torch model."
)
EXACT_UBATCH = 63  # flash attention switches to its tiled kernel at 64 query tokens
FAST_UBATCH = 512  # llama.cpp's default micro-batch
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
DUMMY = MAX_SEQUENCES - 1  # the companion token's scratch sequence
GRAVE = MAX_SEQUENCES - 2  # cells given up while rows are alive (exact mode)
FIRST_CELLS = 4096
# exact mode under sustained load: the cache grows (when empty) to about this many times
# the cells the running rows book, so that rows wait for an empty cache about once every
# DRAIN_ROOM - 1 generations of rows, and no further
DRAIN_ROOM = 8
SLACK = 8  # cells kept free beside the booked ones: a one-token step's companion token
KV_SHARE = 0.5  # default cache budget: this share of the memory available at load


def context_shape(exact: bool) -> tuple[int, int, bool]:
    """(micro-batch tokens, most rows of logits, flash attention) of the contexts muestra
    makes: what sizes llama.cpp's buffers beside the KV cache (`models.memory.LlamaBuffers`)."""
    ubatch = EXACT_UBATCH if exact else FAST_UBATCH
    return ubatch, max(ubatch, MAX_SEQUENCES), exact  # llama.cpp asks outputs >= n_seq_max


class LlamaCppUnavailable(MuestraError):
    """llama-cpp-python is not installed (or does not load)."""


def llama_cpp_module() -> Any:
    """The `llama_cpp` module, or `LlamaCppUnavailable` saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise LlamaCppUnavailable(f"{INSTALL_HINT} ({err})") from err
    return llama_cpp


def available() -> bool:
    try:
        llama_cpp_module()
    except LlamaCppUnavailable:
        return False
    return True


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the test suite shares the cores among its workers), else
    the cores this process may run on."""
    if value := os.environ.get("OMP_NUM_THREADS"):
        try:
            return max(1, int(value))
        except ValueError:
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


_backend_lock = threading.Lock()
_backend_ready = False
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5  # ggml's log levels (DEBUG 1, INFO 2, WARN 3)
_log_state = {"level": 0}


def _log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log: its errors on stderr, everything with MUESTRA_LLAMA_LOG=1 (the
    bindings' own callback maps ggml's levels one off and prints warnings as errors)."""
    if level != GGML_LOG_CONT:
        _log_state["level"] = level
    if _log_state["level"] >= GGML_LOG_ERROR or os.environ.get("MUESTRA_LLAMA_LOG") == "1":
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def _init_backend(lc: Any) -> None:
    global _backend_ready, _log_callback
    with _backend_lock:
        if not _backend_ready:
            # read once by ggml at its first matrix product: keep every size on one path
            os.environ.setdefault("GGML_CPU_TILED_MM", "0")
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            _log_callback = lc.llama_log_callback(_log)  # kept: llama.cpp holds a pointer
            lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _backend_ready = True


_log_callback: Any = None


class _BatchBuffers:
    """A `llama_batch` whose arrays are numpy buffers, filled by slices (one sequence id
    per token)."""

    def __init__(self, lc: Any, capacity: int) -> None:
        self.lc = lc
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq.ctypes.data
        self.seq_pointers = np.array([base + 4 * i for i in range(capacity)], dtype=np.uintp)

    def batch(self, n: int) -> Any:
        lc = self.lc
        batch = lc.llama_batch()
        batch.n_tokens = n
        batch.token = self.token.ctypes.data_as(ctypes.POINTER(lc.llama_token))
        batch.embd = None
        batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        batch.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = self.seq_pointers.ctypes.data_as(
            ctypes.POINTER(ctypes.POINTER(lc.llama_seq_id))
        )
        batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        return batch


def _free_llama(lc: Any, handles: dict[str, Any]) -> None:
    """Free a runtime's llama.cpp context, then its model (each once)."""
    if handles.get("ctx"):
        lc.llama_free(handles["ctx"])
    if handles.get("model"):
        lc.llama_model_free(handles["model"])
    handles["ctx"] = handles["model"] = None


@contextmanager
def vocabulary_only(gguf: Path) -> Iterator[int]:
    """llama.cpp's vocabulary of `gguf` loaded alone (no weights), as a model load holds
    it, for as long as the `with` lasts: yields its size in tokens. The memory plan
    measures the process with it (and the tokenizer) loaded."""
    lc = llama_cpp_module()
    _init_backend(lc)
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not read the vocabulary of {gguf}")
    try:
        yield int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
    finally:
        lc.llama_model_free(model)


class LlamaCppRuntime:
    """A GGUF model in llama.cpp as a runtime (see the module docstring)."""

    name = "llamacpp"
    supports_dola = False
    model = None
    config = None

    def __init__(
        self,
        gguf: Path,
        *,
        threads: int | None = None,
        exact: bool = True,
        cells: int = 0,
        max_cells: int | None = None,
        kv_cache: str | None = None,
    ) -> None:
        lc = llama_cpp_module()
        self.lc = lc
        _init_backend(lc)
        self.path = Path(gguf)
        self.exact = exact
        self.kv_cache = kv_cache or DEFAULT_KV_CACHE
        if self.kv_cache not in RUNTIME_KV_CACHES:
            raise InputError(
                f"kv_cache {self.kv_cache!r} is not a KV cache type muestra runs llama.cpp "
                f"with; use one of {', '.join(RUNTIME_KV_CACHES)}"
            )
        if self.kv_cache != "f16" and not exact:
            raise InputError(
                f"kv_cache {self.kv_cache!r} needs llama.cpp's flash attention, which "
                "batch_invariant = false turns off (--no-batch-invariant): keep exact "
                "batching, or the f16 cache"
            )
        self.threads = threads or default_threads()
        self.ubatch, self.outputs, _ = context_shape(exact)
        read_gguf_header(self.path)  # a damaged or crafted header: one line, before llama.cpp
        params = lc.llama_model_default_params()
        params.use_extra_bufts = False  # see the module docstring (AMX)
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path}: not a GGUF file it reads, or damaged "
                "(llama.cpp's own log says why: set MUESTRA_LLAMA_LOG=1). Check the file, or "
                "pass --runtime torch."
            )
        # llama.cpp's model and context are C memory Python does not see: freed when the
        # runtime is (or by `close`), or a process running many models (a notebook, the
        # tests) keeps every one it ever loaded
        self._handles: dict[str, Any] = {"model": self._model, "ctx": None}
        self._finalizer = weakref.finalize(self, _free_llama, lc, self._handles)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.vocab_size = int(lc.llama_vocab_n_tokens(self._vocab))
        self.num_layers = int(lc.llama_model_n_layer(self._model))
        self.max_length = int(lc.llama_model_n_ctx_train(self._model)) or None
        self.weights_bytes = int(lc.llama_model_size(self._model))
        self.device = torch.device("cpu")
        self._ctx: Any = None
        self._memory: Any = None
        self.cells = 0
        self._requested_cells = cells
        self._free = list(range(GRAVE - 1, -1, -1))  # sequence ids, popped from the end
        self._live: set[int] = set()
        self._lengths: dict[int, int] = {}  # positions each live sequence holds
        self._decoded = 0  # cells taken since the cache was last emptied (exact mode)
        self._booked = 0  # cells booked by the rows running (their whole budgets)
        self.kv_bytes_per_cell = self._kv_bytes_per_cell()
        self.max_cells = max_cells or self.default_max_cells()
        self._starved = False  # rows waited for cells taken (exact mode): grow when empty
        self._peak_booked = 0  # the most cells booked at once
        self.stats = {"decodes": 0, "tokens": 0, "companions": 0, "cells_reused": 0}
        self._buffers = _BatchBuffers(lc, max(self.ubatch, 64))
        self._lock = threading.RLock()

    def close(self) -> None:
        """Free llama.cpp's context and model now (the runtime is unusable after it);
        without it they are freed when the runtime is garbage-collected."""
        self._finalizer()
        self._ctx = self._memory = self._model = None
        self.cells = 0

    # ---- facts ---------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (None when absent)."""
        buffer = ctypes.create_string_buffer(4096)
        size = self.lc.llama_model_meta_val_str(self._model, key.encode(), buffer, 4096)
        return buffer.value.decode("utf-8", errors="replace") if size >= 0 else None

    def _kv_bytes_per_cell(self) -> int:
        """Bytes one KV cell takes: keys and values of every layer's KV heads in the
        cache's type (the GGUF's key/value lengths, else the embedding width over the
        heads; q8_0 stores 34 bytes a block of 32)."""
        lc, model = self.lc, self._model
        arch = self.meta("general.architecture") or ""
        heads = max(1, int(lc.llama_model_n_head(model)))
        width = int(lc.llama_model_n_embd(model)) // heads
        key = int(self.meta(f"{arch}.attention.key_length") or width)
        value = int(self.meta(f"{arch}.attention.value_length") or width)
        kv_heads = int(lc.llama_model_n_head_kv(model))
        size, block = KV_CACHE_SIZES[self.kv_cache]
        return max(1, self.num_layers * kv_heads * (key + value) * size // block)

    def default_max_cells(self) -> int:
        """The cache budget when none is given: the cells whose cache and llama.cpp's
        buffers beside it (which, without flash attention, grow with the cells) take at
        most `KV_SHARE` of the memory available now (MemAvailable), in whole 256-cell
        contexts, but at least `FIRST_CELLS`."""
        try:
            buffers = llama_buffers_from_gguf(read_gguf_header(self.path))
        except MemoryUnknown:  # a GGUF without the shape's keys: the cache alone
            buffers = None
        cells = cells_within(int(KV_SHARE * available_memory()), self.kv_bytes_per_cell,
                             buffers, context_shape(self.exact))  # fmt: skip
        return max(FIRST_CELLS, cells)

    def eog_ids(self) -> list[int]:
        """Every end-of-generation token of the GGUF's vocabulary."""
        lc = self.lc
        found = [lc.llama_vocab_eos(self._vocab), lc.llama_vocab_eot(self._vocab)]
        return sorted({int(t) for t in found if t >= 0 and lc.llama_vocab_is_eog(self._vocab, t)})

    def info(self) -> dict[str, Any]:
        from muestra.models.kit.packaged import file_sha256

        return {
            "runtime": "llamacpp",
            "llama_cpp_python": getattr(self.lc, "__version__", "unknown"),
            "ggml": _library_version("libggml-base.so"),
            "libllama": _library_version("libllama.so"),
            "gguf": str(self.path.resolve()),
            "gguf_sha256": file_sha256(self.path),
            "model": self.meta("general.name"),
            "quantization": _file_type(self.meta("general.file_type")),
            "threads": self.threads,
            "thread_wait": thread_wait_now(),
            "exact": self.exact,
            "ubatch": self.ubatch,
            "flash_attention": self.exact,
            "kv_cache": self.kv_cache,
            "cpu_features": cpu_features(),
            "extra_buffer_types": False,
            "GGML_CPU_TILED_MM": os.environ.get("GGML_CPU_TILED_MM"),
        }

    # ---- the context ---------------------------------------------------------------------

    def fits(self, cells: int) -> bool:
        """Whether rows needing `cells` more KV cells can be booked beside the rows
        already booked: in the cache as it is while rows are alive (it cannot be rebuilt
        under them), else in the largest cache the budget allows (`max_cells`)."""
        with self._lock:
            if not self._live:
                return self._booked + cells + SLACK <= self.max_cells
            if self._booked + cells + SLACK > self.cells:
                return False
            if self.exact and self._decoded + self._booked + cells + SLACK > self.cells:
                # the cells taken come back only when the cache empties: wait for it, and
                # let the next context be larger (`reserve`)
                self._starved = True
                return False
            return True

    def reserve(self, cells: int, *, book: bool = False) -> None:
        """Make room for `cells` more KV cells beside the booked ones: a larger context
        when no row is alive (the cache is rebuilt, never past `max_cells`), else a check
        that they fit. `book=True` keeps them booked until `unbook` (the engine books
        each row's whole budget, prompt + max_new_tokens, until the row ends)."""
        with self._lock:
            need = self._booked + cells + SLACK
            if self._live and need > self.cells:
                raise ContextLengthError(
                    f"llama.cpp's KV cache holds {self.cells} cells, {self._booked} booked by "
                    f"the rows running, and {cells} more are needed; lower max_new_tokens or "
                    "the batch size"
                )
            if not self._live and need > self.max_cells:
                raise ContextLengthError(self._over_budget(cells))
            # rows waited for taken cells: a larger next context, up to DRAIN_ROOM times
            # the most the rows ever booked together (the server's working set)
            starved = self._starved and self.cells < DRAIN_ROOM * self._peak_booked
            if not self._live and (self._ctx is None or need > self.cells or starved):
                size = max(FIRST_CELLS, self._requested_cells, 2 * self.cells)
                while size < need:
                    size *= 2
                size = min(size, self.max_cells)
                if self._ctx is None or size > self.cells:
                    self._new_context(size)
                self._starved = False
            if book:
                self._booked += cells
                self._peak_booked = max(self._peak_booked, self._booked)

    def cap_cells(self, cells: int) -> None:
        """Keep the cache within `cells` (whole llama.cpp contexts of 256 cells), but
        never below the first context (`FIRST_CELLS`): a run's memory plan caps it at the
        context it counted (`planning.LlamaCache`: the rows' cells, their drafts' room and
        the slack), so the doubling growth never takes more than the plan; rows beyond
        wait."""
        with self._lock:
            self.max_cells = min(self.max_cells, max(FIRST_CELLS, cells + (-cells) % 256))

    def unbook(self, cells: int) -> None:
        """Give back cells booked by `reserve(..., book=True)` (rows that ended)."""
        with self._lock:
            self._booked = max(0, self._booked - cells)

    def fits_alone(self, cells: int) -> bool:
        """Whether a row needing `cells` fits the budget with nothing else booked."""
        return cells + SLACK <= self.max_cells

    @property
    def booked(self) -> int:
        """KV cells booked by the rows running (each row's whole budget)."""
        return self._booked

    @property
    def taken(self) -> int:
        """KV cells taken since the cache was last empty (exact mode: none comes back
        while rows are alive)."""
        return self._decoded

    def _over_budget(self, cells: int) -> str:
        budget = self.max_cells * self.kv_bytes_per_cell / 2**30
        return (
            f"{cells} KV cells are needed ({self._booked} more booked), more than the cache "
            f"budget of {self.max_cells} cells ({budget:.2f} GiB at "
            f"{self.kv_bytes_per_cell} bytes a cell); lower max_new_tokens (max_tokens) or "
            "the number of samples, or raise the budget (muestra serve --max-memory)"
        )

    def kv_cells_for_bytes(self, kv_bytes: int) -> int:
        """How many KV cells `kv_bytes` hold (f16 keys and values, every layer)."""
        return max(0, kv_bytes // self.kv_bytes_per_cell)

    def _new_context(self, cells: int) -> None:
        lc = self.lc
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = self._handles["ctx"] = None
        params = lc.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = self.ubatch
        params.n_seq_max = MAX_SEQUENCES
        params.n_outputs_max = self.outputs
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.threads
        # exact: flash attention sums each query's cells one by one, in cell order (the
        # invariant path); free: the matrix-product path, faster here (see the docstring)
        params.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.exact else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.swa_full = True  # sliding-window rows can be cropped and copied
        params.type_k = params.type_v = getattr(lc, f"GGML_TYPE_{self.kv_cache.upper()}")
        params.no_perf = True
        ctx = lc.llama_init_from_model(self._model, params)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not make a context of {cells} cells for {self.path} "
                "(out of memory?); lower the batch size or max_new_tokens"
            )
        self._ctx, self.cells = ctx, int(lc.llama_n_ctx(ctx))
        self._handles["ctx"] = ctx
        self._memory = lc.llama_get_memory(ctx)
        self._decoded = 0

    def _empty(self) -> None:
        """No row alive: every cell is free again."""
        if self._ctx is not None:
            self.lc.llama_memory_clear(self._memory, True)
        self._decoded = 0

    # ---- sequence ids ----------------------------------------------------------------------

    def _take(self) -> int:
        if not self._free:
            raise InputError(
                f"llama.cpp holds at most {GRAVE} rows (sequences) at once; lower the batch "
                "size, num_beams or field_probs' max_expansions"
            )
        seq = self._free.pop()
        self._live.add(seq)
        return seq

    def _give_up(self, seq: int, p0: int = -1) -> None:
        """Forget `seq`'s positions from `p0` on (all with -1); in exact mode their cells
        stay taken by the graveyard, so that no live row's next cell comes before its
        older ones."""
        lc = self.lc
        if self.exact:
            lc.llama_memory_seq_cp(self._memory, seq, GRAVE, p0, -1)
        lc.llama_memory_seq_rm(self._memory, seq, p0, -1)

    def _release(self, seqs: Sequence[int]) -> None:
        with self._lock:
            for seq in seqs:
                if seq in self._live:
                    self._give_up(seq)
                    self._live.discard(seq)
                    self._lengths.pop(seq, None)
                    self._free.append(seq)
            if not self._live:
                self._empty()

    # ---- computing -----------------------------------------------------------------------

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        room: int,
        logits: LogitsWanted = "last",
        layers: frozenset[int] = frozenset(),
    ) -> tuple[LlamaSequences, Fed]:
        """Each prompt into a new row (`room`: the positions each row may still take)."""
        check_cancelled()
        if layers:
            raise InputError(_no_dola())
        if not self._live and not self._booked:  # else the caller reserved (the engine)
            self.reserve(sum(len(p) for p in prompts) + len(prompts) * room)
        with self._lock:
            rows = LlamaSequences(self, [self._take() for _ in prompts], [0] * len(prompts))
        return rows, rows.feed(prompts, logits)

    def resume(self, contexts: Sequence[Any], lengths: Sequence[int]) -> LlamaSequences:
        """New rows, each sharing the cells of its context's first `lengths[i]` positions."""
        with self._lock:
            seqs = []
            for context, need in zip(contexts, lengths, strict=True):
                seq = self._take()
                self.lc.llama_memory_seq_cp(self._memory, context.seq, seq, 0, need)
                seqs.append(seq)
            return LlamaSequences(self, seqs, list(lengths))

    def decode(
        self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray, outputs: np.ndarray
    ) -> torch.Tensor:
        """Decode the tokens (one sequence id each); the logits of the tokens whose
        `outputs` flag is set, in order, as (n_outputs, V) float32."""
        with self._lock:
            n = len(tokens)
            self._make_room(n)
            result = torch.empty(int(outputs.sum()), self.vocab_size, dtype=torch.float32)
            written = 0
            for start, end in self._chunks(n):
                written += self._decode_chunk(
                    tokens[start:end], positions[start:end], seqs[start:end],
                    outputs[start:end], result, written,
                )  # fmt: skip
            return result

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """Micro-batches of at most `ubatch` tokens; in exact mode balanced, so that none
        holds a single token unless the whole feed does."""
        if not self.exact:
            return [(s, min(s + self.ubatch, n)) for s in range(0, n, self.ubatch)]
        count = -(-n // self.ubatch)
        size, extra = divmod(n, count)
        bounds, start = [], 0
        for k in range(count):
            end = start + size + (1 if k < extra else 0)
            bounds.append((start, end))
            start = end
        return bounds

    def _decode_chunk(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        seqs: np.ndarray,
        outputs: np.ndarray,
        result: torch.Tensor,
        written: int,
    ) -> int:
        lc, buffers = self.lc, self._buffers
        n = len(tokens)
        flags = outputs.astype(np.int8)
        wanted = np.flatnonzero(flags)
        companion = False
        if self.exact and len(wanted) == 1 and n > 1:
            # one output would take the one-column kernels: ask for a second one
            flags[0 if wanted[0] != 0 else 1] = 1
        elif self.exact and n == 1:
            companion = True
        size = n + int(companion)
        buffers.token[:n], buffers.pos[:n], buffers.seq[:n] = tokens, positions, seqs
        buffers.logits[:n] = flags
        if companion:
            buffers.token[n], buffers.pos[n], buffers.seq[n] = tokens[0], 0, DUMMY
            buffers.logits[n] = 1 if len(wanted) == 1 else 0
            self.stats["companions"] += 1
        status = lc.llama_decode(self._ctx, buffers.batch(size))
        if companion:
            # the companion took the last cell: freed now, the next token takes it, after
            # its row's older cells (a lone row no longer spends two cells a token)
            lc.llama_memory_seq_rm(self._memory, DUMMY, -1, -1)
            self._decoded -= 1
        if status == 1:
            raise ContextLengthError(
                f"llama.cpp's KV cache ({self.cells} cells) is full; lower max_new_tokens "
                "or the batch size"
            )
        if status != 0:
            raise RuntimeError(
                f"llama_decode failed ({status}) on {size} tokens with {self.cells} KV cells"
            )
        self._decoded += size
        self.stats["decodes"] += 1
        self.stats["tokens"] += size
        if len(wanted) == 0:
            return 0
        produced = int(buffers.logits[:size].sum())
        pointer = lc.llama_get_logits(self._ctx)
        view = np.ctypeslib.as_array(pointer, shape=(produced, self.vocab_size))
        # the rows of `view` follow the flagged tokens in order; keep the asked ones
        flagged = np.flatnonzero(buffers.logits[:size])
        keep = np.searchsorted(flagged, wanted)
        block = torch.from_numpy(view)
        if len(keep) == produced:
            result[written : written + produced].copy_(block)
        else:
            result[written : written + len(keep)].copy_(block[torch.from_numpy(keep)])
        return len(keep)

    def _make_room(self, n: int) -> None:
        """Before decoding `n` tokens: a context when there is none; in exact mode, when
        they would not fit — only when rows took cells beyond their budgets (unbooked
        expansions, many rejected drafts): admission (`fits`) counts the cells taken —
        the graveyard's cells are freed (counted in `stats["cells_reused"]`, shown by
        `/health`: rows alive from then on may differ in the last bits from the same
        rows alone)."""
        if self._ctx is None:
            self.reserve(n + 64)
        if not self.exact or self._decoded + n + 1 <= self.cells:
            return
        lc = self.lc
        lc.llama_memory_seq_rm(self._memory, GRAVE, -1, -1)
        lc.llama_memory_seq_rm(self._memory, DUMMY, -1, -1)
        self.stats["cells_reused"] += 1
        # a bound on the cells the rows alive still hold (shared prompt cells counted
        # once per row)
        self._decoded = min(self.cells, sum(self._lengths.values()))


@dataclass(eq=False)
class LlamaContext:
    """A copy (tagged cells) of a row's first `length` positions."""

    runtime: LlamaCppRuntime
    seq: int
    length: int

    def release(self) -> None:
        if self.seq >= 0:
            self.runtime._release([self.seq])
            self.seq = -1


class LlamaSequences:
    """Rows of the runtime's KV cache: one llama.cpp sequence each."""

    can_merge = True
    can_crop = True

    def __init__(self, runtime: LlamaCppRuntime, seqs: list[int], lengths: list[int]) -> None:
        self.runtime = runtime
        self.seqs = seqs
        self.lengths = lengths
        self._sync()

    def __len__(self) -> int:
        return len(self.seqs)

    def _sync(self) -> None:
        """Tell the runtime how many positions each row holds (for its cell bound)."""
        self.runtime._lengths.update(zip(self.seqs, self.lengths, strict=True))

    pads_ragged = False  # every token is its own batch entry: ragged rows cost nothing

    def feed(
        self,
        tokens: Sequence[Sequence[int]],
        logits: LogitsWanted = "last",
        layers: frozenset[int] = frozenset(),
    ) -> Fed:
        check_cancelled()
        if layers:
            raise InputError(_no_dola())
        counts = [len(t) for t in tokens]
        total = sum(counts)
        assert total > 0, "feed at least one token"
        flat = np.fromiter((t for row in tokens for t in row), dtype=np.int32, count=total)
        seqs = np.repeat(np.array(self.seqs, dtype=np.int32), counts)
        starts = np.repeat(np.array(self.lengths, dtype=np.int32), counts)
        offsets = np.arange(total, dtype=np.int32) - np.repeat(
            np.cumsum([0, *counts[:-1]], dtype=np.int32), counts
        )
        if logits == "all":
            outputs = np.ones(total, dtype=bool)
        else:
            outputs = np.zeros(total, dtype=bool)
            ends = np.cumsum(counts) - 1
            outputs[ends[np.array(counts) > 0]] = True
        produced = self.runtime.decode(flat, starts + offsets, seqs, outputs)
        self.lengths = [n + c for n, c in zip(self.lengths, counts, strict=True)]
        self._sync()
        vocab = self.runtime.vocab_size
        if logits == "all":
            ahead, at = [], 0
            for c in counts:
                ahead.append(produced[at : at + c])
                at += c
            last = torch.stack([a[-1] if len(a) else a.new_zeros(vocab) for a in ahead])
            return Fed(last, ahead)
        if all(counts):
            return Fed(produced)
        last = produced.new_zeros(len(counts), vocab)
        last[torch.tensor([i for i, c in enumerate(counts) if c])] = produced
        return Fed(last)

    def select(self, index: Sequence[int], trim: bool = True) -> None:
        """Keep rows `index` in that order; a repeated row is a copy whose cells are
        shared (`trim` is for the torch runtime's cache width)."""
        runtime = self.runtime
        with runtime._lock:
            taken: set[int] = set()
            seqs, lengths = [], []
            for i in index:
                source = self.seqs[i]
                if source in taken:  # a second copy: tag its cells with a new sequence
                    seq = runtime._take()
                    runtime.lc.llama_memory_seq_cp(runtime._memory, source, seq, -1, -1)
                else:
                    seq = source
                    taken.add(source)
                seqs.append(seq)
                lengths.append(self.lengths[i])
            gone = [s for s in self.seqs if s not in taken]
            self.seqs, self.lengths = seqs, lengths
            self._sync()
            runtime._release(gone)

    def crop(self, row: int, length: int) -> None:
        if length >= self.lengths[row]:
            return
        with self.runtime._lock:
            self.runtime._give_up(self.seqs[row], length)
        self.lengths[row] = length
        self._sync()

    def clone(self, rows: Sequence[int]) -> LlamaSequences:
        runtime = self.runtime
        with runtime._lock:
            seqs = []
            for i in rows:
                seq = runtime._take()
                runtime.lc.llama_memory_seq_cp(runtime._memory, self.seqs[i], seq, -1, -1)
                seqs.append(seq)
        return LlamaSequences(runtime, seqs, [self.lengths[i] for i in rows])

    def merge(self, other: LlamaSequences, room: int) -> None:  # type: ignore[override]
        assert other.runtime is self.runtime, "rows of two llama.cpp runtimes cannot merge"
        self.seqs += other.seqs
        self.lengths += other.lengths
        other.seqs, other.lengths = [], []

    def context(self, row: int, length: int) -> LlamaContext:
        runtime = self.runtime
        with runtime._lock:
            seq = runtime._take()
            runtime.lc.llama_memory_seq_cp(runtime._memory, self.seqs[row], seq, 0, length)
            runtime._lengths[seq] = length
        return LlamaContext(runtime, seq, length)

    def close(self) -> None:
        self.runtime._release(self.seqs)
        self.seqs, self.lengths = [], []


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _no_dola() -> str:
    return (
        "DoLa contrasts the final layer with premature layers' hidden states, which the "
        "llamacpp runtime does not expose; use --runtime torch (a dequantized model) for DoLa"
    )


def _library_version(name: str) -> str | None:
    """The version in the file name of a llama_cpp shared library (libggml-base.so.0.25.3)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    folder = Path(llama_cpp.__file__).parent / "lib"
    versions = sorted(p.name.removeprefix(name + ".") for p in folder.glob(name + ".*.*.*"))
    return versions[-1] if versions else None


# What a portable build (GGML_NATIVE=OFF, `make install`'s) compiles ggml's CPU kernels
# for on x86-64; a feature beyond these (AVX512*, AVX_VNNI, AMX*) means a native build,
# whose samples differ in the last bits from the portable build's on the same seed.
PORTABLE_X86 = ("SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2")


def cpu_features() -> list[str]:
    """The instruction-set features llama.cpp's CPU kernels were compiled with, as
    `llama_print_system_info` lists them (`["SSE3", "AVX2", ...]`): two machines whose
    builds list the same features run the same kernels and sample the same bits."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    found = []
    for part in info.split("|"):
        name, _, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if name and value.strip() == "1" and name not in ("LLAMAFILE", "OPENMP", "REPACK"):
            found.append(name)
    return found


FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
              10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S",
              15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}  # fmt: skip


def _file_type(value: str | None) -> str | None:
    if value is None or not value.isdigit():
        return value
    return FILE_TYPES.get(int(value), value)
