"""Options and printing helpers shared by the commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from muestra.limits import MAX_THREADS

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)

MODEL_HELP = (
    "Hub id (e.g. Qwen/Qwen3-4B-Thinking-2507) or local folder (e.g. one written by "
    "`muestra kit build`)."
)

JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")
DtypeOption = typer.Option(
    "auto", "--dtype", help="auto (as saved) | bfloat16 | float16 | float32."
)
DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda.")
AllowPickleOption = typer.Option(
    False, "--allow-pickle", help="Allow pickle (.bin) weights, which can run arbitrary code."
)
TrustRemoteCodeOption = typer.Option(
    False, "--trust-remote-code", help="Run modelling code shipped with the model."
)
RUNTIME_HELP = (
    "What computes the logits: llamacpp (a GGUF with llama.cpp's CPU kernels) | torch "
    "(transformers) | auto: llamacpp for a GGUF alone when llama-cpp-python is installed "
    "(and no --dtype is asked for), else torch."
)
THREADS_HELP = "CPU threads of the runtime (default: the cores, or OMP_NUM_THREADS)."
INVARIANT_HELP = (
    "llamacpp: a sample's logits never depend on the rows decoded beside it (default); "
    "--no-batch-invariant: llama.cpp's own batching, faster for a single row."
)
THREAD_WAIT_HELP = (
    "How idle compute threads wait: sleep (give the core back at once: the default, and "
    "what a machine shared with other work needs) | spin (OpenMP's default: spin for "
    "milliseconds first; a little faster on idle cores). Default: the environment's "
    "OMP_WAIT_POLICY, else sleep."
)


def _apply_thread_wait(value: str | None) -> str | None:
    """Set the process's wait policy as the option is parsed: before any command imports
    torch (which fixes it)."""
    from muestra.models.runtime.threads import apply_thread_wait

    apply_thread_wait(value)
    return value


RuntimeOption = typer.Option("auto", "--runtime", help=RUNTIME_HELP)
ThreadWaitOption = typer.Option(
    None, "--thread-wait", help=THREAD_WAIT_HELP, callback=_apply_thread_wait
)
ThreadsOption = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help=THREADS_HELP)
BatchInvariantOption = typer.Option(
    True, "--batch-invariant/--no-batch-invariant", help=INVARIANT_HELP
)
KV_CACHE_HELP = (
    "llamacpp: the KV cache's type, f16 (default) | q8_0: 0.53x the memory a token (twice "
    "the rows in the same --max-memory), logits slightly changed; exact batching only."
)


def _kv_cache(value: str | None) -> str | None:
    from muestra.models.memory import RUNTIME_KV_CACHES

    if value is not None and value not in RUNTIME_KV_CACHES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(RUNTIME_KV_CACHES)}")
    return value


KvCacheOption = typer.Option(None, "--kv-cache", help=KV_CACHE_HELP, callback=_kv_cache)
# the same settings for commands that run specs: unset, each model's own [model] setting
RuntimeOverrideOption = typer.Option(
    None, "--runtime", help=RUNTIME_HELP + " Default: each model's `runtime` in the spec."
)
BatchInvariantOverrideOption = typer.Option(
    None, "--batch-invariant/--no-batch-invariant", help=INVARIANT_HELP
)
MaxMemoryOption = typer.Option(
    None,
    "--max-memory",
    help='Memory budget of a local model: "8GiB", "12GB", "500MiB" or bytes. Rows that do '
    "not fit wait for the next batch; a run that cannot fit one row is refused before the "
    "model loads. Default: the spec's [run] max_memory, else 80% of the memory available.",
)


def model_options(
    runtime: str | None,
    threads: int | None,
    batch_invariant: bool | None,
    thread_wait: str | None = None,
    max_memory: str | None = None,
    kv_cache: str | None = None,
) -> dict[str, Any]:
    """The runtime settings given on the command line, as [model] spec fields, and the
    memory budget (`max_memory`, the run's: the runner takes it out)."""
    given = {"runtime": runtime, "threads": threads, "batch_invariant": batch_invariant,
             "thread_wait": thread_wait, "max_memory": max_memory,
             "kv_cache": kv_cache}  # fmt: skip
    return {key: value for key, value in given.items() if value is not None}


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def visible(text: str) -> str:
    """Text with control characters shown as escapes, for one table cell."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def plural(count: int, word: str) -> str:
    """`word`, or its plural for a count other than one ("1 sample", "2 samples")."""
    return word if count == 1 else f"{word}s"


def run_status(db: Any, run: Any) -> dict[str, Any]:
    """The run's status for `--json` output, and a warning on stderr when it is not
    finished (failed, stopped or still running): its numbers are a partial result."""
    from muestra.experiments.store import run_state, unfinished_warning

    status, reason = run_state(db, run)
    warning = unfinished_warning(db, run)
    if warning:
        stderr.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    return {"status": status, "reason": reason}


@contextmanager
def stopped_is_resumable() -> Iterator[None]:
    """Ctrl-C: say that the finished batches are stored, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        stderr.print(
            "stopped; finished batches are stored. Run the same command to resume.",
            markup=False,
        )
        sys.exit(130)
