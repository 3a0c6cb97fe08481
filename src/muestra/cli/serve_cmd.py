"""`muestra serve`: the engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import typer

from muestra.cli.common import (
    MODEL_HELP,
    AllowPickleOption,
    BatchInvariantOption,
    DeviceOption,
    DtypeOption,
    KvCacheOption,
    RuntimeOption,
    ThreadsOption,
    ThreadWaitOption,
    TrustRemoteCodeOption,
)

if TYPE_CHECKING:
    from muestra.experiments.planning import Budget, KvCachePlan


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: str = typer.Argument(..., help=MODEL_HELP),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind (loopback unless you say otherwise)."
    ),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="MUESTRA_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every /v1 route (/health stays open).",
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="The model name clients send (default: MODEL)."
    ),
    max_batch: int = typer.Option(
        64, "--max-batch", min=1, help="Most rows (samples) decoding together."
    ),
    max_tokens_limit: int | None = typer.Option(
        None,
        "--max-tokens-limit",
        min=1,
        help="Refuse requests whose max_tokens is above this (413).",
    ),
    max_body_bytes: int = typer.Option(
        8 * 1024 * 1024, "--max-body-bytes", min=1024, help="Refuse larger bodies (413)."
    ),
    max_rows_per_request: int = typer.Option(
        256,
        "--max-rows-per-request",
        min=1,
        help="Refuse requests asking for more rows (prompts × n) than this (413).",
    ),
    max_queued_rows: int = typer.Option(
        2048,
        "--max-queued-rows",
        min=1,
        help="Samples waiting or decoding, all requests together; a request beyond it "
        "gets 503 (retry later). At least --max-rows-per-request.",
    ),
    max_grammar_bytes: int = typer.Option(
        64 * 1024,
        "--max-grammar-bytes",
        min=16,
        help="Refuse response_format schemas larger than this, as compact JSON (413).",
    ),
    grammar_timeout: float = typer.Option(
        10.0,
        "--grammar-timeout",
        min=0.1,
        help="Seconds a response_format grammar may take to compile, waiting included (400).",
    ),
    grammar_cache_mb: int = typer.Option(
        256,
        "--grammar-cache-mb",
        min=1,
        help="Memory for compiled grammars; the least recently used are dropped beyond it.",
    ),
    trust_request_chat_template: bool = typer.Option(
        False,
        "--trust-request-chat-template",
        help="Render chat templates sent by clients (chat_template, or inside "
        "chat_template_kwargs), bounded by time and size; refused (400) otherwise.",
    ),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    allow_pickle: bool = AllowPickleOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str = RuntimeOption,
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    batch_invariant: bool = BatchInvariantOption,
    kv_cache: str | None = KvCacheOption,
    draft_model: str | None = typer.Option(
        None,
        "--draft-model",
        help='A speculative draft for requests that send "speculative": true: a model with '
        "the same vocabulary, or layers:N for the model's own first N layers.",
    ),
    num_speculative_tokens: int = typer.Option(
        4, "--num-speculative-tokens", min=1, max=32, help="Draft tokens per round."
    ),
    max_memory: str | None = typer.Option(
        None,
        "--max-memory",
        help='Memory for the weights and the KV cache (llama.cpp runtime): "8GiB", "12GB", '
        '"500MiB" or bytes. The cache may grow to the cells left after the weights; rows '
        "beyond them wait. Refused below the weights plus 4,096 cells. Default: the cells "
        "half the memory available at load holds.",
    ),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's log level."),
) -> None:
    """Serve MODEL over OpenAI's API: GET /health, GET /v1/models, POST /v1/chat/completions
    and POST /v1/completions. Concurrent requests share the engine's batches (continuous
    batching). Chat requests take OpenAI's fields plus vLLM's extras: top_k, min_p,
    repetition_penalty, thinking_token_budget (caps the reasoning), chat_template_kwargs
    (e.g. {"enable_thinking": false}); response_format json_object / json_schema is
    enforced with a grammar after the reasoning; the reasoning comes back apart, as
    `reasoning_content`. max_tokens counts reasoning tokens too (as vLLM). It also serves
    the tokenizer routes lm-evaluation-harness's remote tokenizer calls: GET
    /tokenizer_info, POST /tokenize and POST /detokenize.

    \f
    (For readers of the code: one piece, because typer reads a command's options from its
    signature; each option is a parameter, and the body is short.)
    """
    from muestra.allocator import single_malloc_arena

    single_malloc_arena()  # before torch starts threads: see its docstring
    from muestra.experiments.planning import given_budget
    from muestra.models.loading import load_model, resolve_model

    budget = None if max_memory is None else given_budget(max_memory, "--max-memory")
    check_port(host, port)
    if max_queued_rows < max_rows_per_request:
        raise typer.BadParameter(
            f"{max_queued_rows} is below --max-rows-per-request ({max_rows_per_request})",
            param_hint="--max-queued-rows",
        )
    resolve_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    cache = None
    if budget is not None:  # applied, or refused by name, before the model loads
        cache = kv_cache_plan(
            model, budget, runtime, dtype, device, allow_pickle, trust_remote_code, kv_cache,
            batch_invariant,
        )  # fmt: skip
    import uvicorn  # the server's pieces import torch: after the checks above

    from muestra.answers.drafted import load_draft
    from muestra.cli.common import stderr
    from muestra.engine.engine import drafts_off_note
    from muestra.server.app import check_api_key, create_app
    from muestra.server.service import ServedModel

    check_api_key(api_key)  # before the model loads
    loaded = load_model(
        model,
        dtype=dtype,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        runtime=runtime,  # type: ignore[arg-type]
        threads=threads,
        thread_wait=thread_wait,
        batch_invariant=batch_invariant,
        kv_cache=kv_cache,
    )
    if cache is not None:
        assert loaded.runtime.name == "llamacpp", "kv_cache_plan chose the llama.cpp runtime"
        loaded.runtime.max_cells = cache.cells
    served = ServedModel(
        loaded,
        served_model_name or model,
        max_batch=max_batch,
        max_tokens_limit=max_tokens_limit,
        max_rows_per_request=max_rows_per_request,
        max_queued_rows=max_queued_rows,
        max_grammar_bytes=max_grammar_bytes,
        grammar_timeout=grammar_timeout,
        grammar_cache_bytes=grammar_cache_mb * 2**20,
        trust_request_chat_template=trust_request_chat_template,
        draft=None if draft_model is None else load_draft(loaded, draft_model, dtype, device),
        num_speculative_tokens=num_speculative_tokens,
    )
    app = create_app(served, api_key=api_key, max_body_bytes=max_body_bytes)
    thinking = "thinks" if served.tags is not None else "does not think"
    stderr.print(
        f"muestra serve: {served.name} ({thinking}, {loaded.runtime.name} runtime) on "
        f"http://{host}:{port}/v1" + (" (API key required)" if api_key else ""),
        markup=False,
    )
    if cache is not None:
        stderr.print(f"muestra serve: {cache.describe()}", markup=False)
    note = drafts_off_note(loaded.runtime.config, [])
    if note is not None:
        stderr.print(f"note: {note}", markup=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        stderr.print(f"warning: listening on {host}, not only on this machine", markup=False)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, an address this process cannot listen on (a port
    another process holds): uvicorn would find it only after the load, and exit 1."""
    from muestra.errors import InputError

    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as err:
        raise InputError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); another "
            "process may hold the port: pass another --port"
        ) from err


def kv_cache_plan(
    model: str,
    budget: Budget,
    runtime: str,
    dtype: str,
    device: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    kv_cache: str | None = None,
    batch_invariant: bool = True,
) -> KvCachePlan:
    """`--max-memory` applied before the model loads: the llama.cpp cache it allows, read
    from the GGUF's header; refused by name on the torch runtime, whose KV cache grows
    with the rows running and has no budget to set."""
    from muestra.errors import InputError
    from muestra.experiments.planning import kv_cells_budget, llama_cache
    from muestra.models.loading import auto_runtime, check_model, choose_runtime
    from muestra.models.memory import model_memory

    files = check_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if choose_runtime(model, files, auto_runtime(runtime, dtype, device)) != "llamacpp":
        raise InputError(
            f"{budget.source}: --max-memory is applied on the llama.cpp runtime only; on "
            f"torch (which runs {model} here) the KV cache grows with the rows running and "
            "has no budget to set. Serve a GGUF with --runtime llamacpp, or leave "
            "--max-memory out (--max-batch bounds the rows decoding together)"
        )
    memory = model_memory(files, "llamacpp", kv_cache=kv_cache)
    return kv_cells_budget(budget, memory, llama_cache(batch_invariant))
