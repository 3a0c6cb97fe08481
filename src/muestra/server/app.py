"""The HTTP side of `muestra serve`: FastAPI routes in OpenAI's shape.

Routes: `GET /health` (no key needed), `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`, and the tokenizer routes lm-evaluation-harness's remote
tokenizer calls (vLLM's, at the server's root): `GET /tokenizer_info`, `POST /tokenize`,
`POST /detokenize`. Every error is answered as
`{"error": {"message", "type", "param", "code"}}` with its status: 400 bad parameters,
401 missing or wrong key, 404 unknown model or route, 413 body, grammar or rows above a
limit, 503 when the queue is full (`--max-queued-rows`: retry later), 500 only for a
fault of the server itself. Streaming is Server-Sent Events
(`data: {chunk}` … `data: [DONE]`); a client that goes away frees its rows at once,
streaming or not. One formatter per API: a whole reply is its stream's chunks joined, so
both carry the same fields (text, reasoning, logprobs, finish reason, extension, usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from muestra.engine.progress import peak_resident_bytes, resident_bytes
from muestra.errors import InputError
from muestra.models.runtime.base import CANCEL, Cancelled
from muestra.server import beams, drafting, echo
from muestra.server.jobs import Finished, Job, SampleText, TokenRecord
from muestra.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    find_surrogate,
)
from muestra.server.service import ServedModel
from muestra.version import __version__

DEFAULT_MAX_BODY = 8 * 1024 * 1024


def create_app(
    served: ServedModel, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY
) -> FastAPI:
    check_api_key(api_key)
    # the schema describes the API: behind a key, keep it behind the key by not serving it
    app = FastAPI(
        title="muestra",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None if api_key is not None else "/openapi.json",
    )
    app.state.served = served
    keyed = [Depends(key_check(api_key))]
    off_loop = {"cancelled": 0}  # searches stopped because their client left
    _error_handlers(app)
    _info_routes(app, served, keyed, off_loop)
    _completion_routes(app, served, [*keyed, Depends(check_text)], off_loop)
    _tokenizer_routes(app, served, keyed)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.router.add_event_handler("shutdown", served.close)
    return app


def key_check(api_key: str | None) -> Callable[[Request], Any]:
    """The dependency that refuses a request without the server's key (none: all pass)."""
    expected = api_key.encode("ascii") if api_key is not None else b""

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # headers arrive decoded as latin-1: compare bytes, so any header is just "wrong"
        sent = token.strip().encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not secrets.compare_digest(sent, expected):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY' with the key "
                "given to `muestra serve --api-key`",
                code="invalid_api_key",
            )

    return check_key


async def check_text(request: Request) -> None:
    """Runs before the body is validated: pydantic cannot even read a lone surrogate."""
    try:
        body = await request.json()
    except ValueError:
        return  # not JSON: body validation answers that
    where = find_surrogate(body)
    if where is not None:
        raise ApiError(
            400,
            f"{where or 'the body'} holds a lone UTF-16 surrogate (such as \\ud800), "
            "which is not text; send valid Unicode",
            param=where or None,
        )


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, with its status."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(err).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        error = ApiError(err.status_code, str(err.detail), code=None)
        return JSONResponse(error.body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> JSONResponse:
        error = ApiError(500, f"internal error: {type(err).__name__}: {err}", code="internal")
        return JSONResponse(error.body(), status_code=500)


def _progress(served: ServedModel) -> dict[str, Any]:
    """Throughput over the recent window, the time the open rows need at that rate,
    memory, and (llama.cpp) the KV cache: cells, budget, booked by the rows running,
    taken since it was last empty, and how often cells were reused under live rows."""
    scheduler, runtime = served.scheduler, served.text.engine.runtime
    rows_per_s, tokens_per_s = scheduler.rate.rates()
    open_rows = scheduler.open_rows
    return {
        "rate_window_seconds": scheduler.rate.window,
        "tokens_per_second": round(tokens_per_s, 2),
        "rows_per_second": round(rows_per_s, 3),
        "rows_done": scheduler.rate.done,
        "tokens_generated": scheduler.rate.tokens,
        "queue_eta_seconds": round(open_rows / rows_per_s, 1) if rows_per_s > 0 else None,
        "rss_bytes": resident_bytes(),
        "peak_rss_bytes": peak_resident_bytes(),
        "kv_cells": getattr(runtime, "cells", None),
        "kv_cells_budget": getattr(runtime, "max_cells", None),
        "kv_cells_booked": getattr(runtime, "booked", None),
        "kv_cells_taken": getattr(runtime, "taken", None),
        # times cells were reused under live rows (exact mode: their bits may differ)
        "kv_cells_reused": getattr(runtime, "stats", {}).get("cells_reused"),
    }


def _info_routes(
    app: FastAPI, served: ServedModel, keyed: list[Any], off_loop: dict[str, int]
) -> None:
    """`GET /health` (no key needed) and `GET /v1/models`."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        scheduler = served.scheduler
        grammars = served.grammars.backend
        return {
            "status": "ok",
            "model": served.name,
            "pid": os.getpid(),  # who answers: `mn.serve` checks it is its own child
            "rows_running": scheduler.stats["running"],
            "rows_waiting": scheduler.waiting,
            "steps": scheduler.stats["steps"],
            "max_rows_in_a_step": scheduler.stats["max_rows"],
            "admissions": scheduler.stats["admissions"],
            "busy_seconds": round(scheduler.stats["busy_s"], 3),
            "prefill_seconds": round(scheduler.stats["prefill_s"], 3),
            **_progress(served),
            "grammar_cache_bytes": grammars.memory_bytes if grammars else 0,
            # beam searches and drafted requests: one at a time, beside the scheduler
            "search_running": served.beam_lock.locked(),
            "searches_cancelled": off_loop["cancelled"],
        }

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": served.created,
                    "owned_by": "muestra",
                    "max_model_len": served.context,
                }
            ],
        }


def _completion_routes(
    app: FastAPI, served: ServedModel, checked: list[Any], off_loop: dict[str, int]
) -> None:
    """`POST /v1/chat/completions` and `POST /v1/completions`: drafted decoding and beam
    search off the event loop, everything else through the scheduler (streamed or not)."""

    @app.post("/v1/chat/completions", dependencies=checked)
    async def chat(body: ChatRequest, request: Request) -> Any:
        if body.prompt_lookup is not None or body.speculative:
            return await _off_loop(request, drafting.chat(served, body), off_loop)
        if body.use_beam_search:
            return await _off_loop(request, beams.chat(served, body), off_loop)
        job = await served.chat_job(body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(job, body, include_usage), job)
        return await _until_disconnect(request, job, _chat_response(job, body))

    @app.post("/v1/completions", dependencies=checked)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.echo:
            return await echo.completion(served, body)
        if body.prompt_lookup is not None or body.speculative:
            return await _off_loop(request, drafting.completion(served, body), off_loop)
        if body.use_beam_search:
            return await _off_loop(request, beams.completion(served, body), off_loop)
        job = await served.completion_job(body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_text_chunks(job, body, include_usage), job)
        return await _until_disconnect(request, job, _text_response(job, body))


def _tokenizer_routes(app: FastAPI, served: ServedModel, keyed: list[Any]) -> None:
    """lm-evaluation-harness's remote tokenizer (vLLM's routes, at the server's root)."""

    @app.get("/tokenizer_info", dependencies=keyed)
    async def tokenizer_info() -> dict[str, Any]:
        return echo.tokenizer_info(served)

    @app.post("/tokenize", dependencies=[*keyed, Depends(check_text)])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await asyncio.to_thread(echo.tokenize, served, body.prompt, body.add_special_tokens)

    @app.post("/detokenize", dependencies=[*keyed, Depends(check_text)])
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await asyncio.to_thread(echo.detokenize, served, body.tokens)


def check_api_key(api_key: str | None) -> None:
    """Refuse a key no HTTP header can carry (it would make every request fail)."""
    if api_key is not None and not _printable_ascii(api_key):
        raise InputError(
            "the API key must be printable ASCII (an HTTP header carries it); "
            "choose another --api-key"
        )


def _printable_ascii(text: str) -> bool:
    return bool(text) and all(" " < c <= "~" for c in text)


def _validation_error(err: RequestValidationError) -> ApiError:
    first = err.errors()[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg')}")
    message = first.get("msg", "invalid request")
    if param:
        given = first.get("input")
        shown = json.dumps(given, ensure_ascii=False, default=str)[:80] if given is not None else ""
        message = f"{param}: {message}" + (f" (got {shown})" if shown else "")
    return ApiError(400, message, param=param)


class BodyLimit:
    """413 for bodies above `limit` bytes, whether or not they announce their length."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        error = ApiError(
            413, f"the request body is larger than {self.limit} bytes", code="body_too_large"
        )
        payload = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _off_loop(request: Request, work: Any, counters: dict[str, int]) -> Any:
    """Await `work`, a beam search or drafted request that computes in a worker thread,
    one at a time (`ServedModel.beam_lock`). Its thread sees the cancel event set here
    (`runtime.base.CANCEL`): when the client disconnects first, the search stops at its
    next step and frees the lock for the next request, instead of running to its end."""
    event = threading.Event()
    token = CANCEL.set(event)
    try:
        task = asyncio.ensure_future(work)  # the task (and its thread) copy this context
    finally:
        CANCEL.reset(token)

    def stop() -> None:
        event.set()
        counters["cancelled"] += 1

    # the answer waits for the thread to stop: it releases the lock for the next request
    return await _unless_client_leaves(request, task, stop, wait=True)


async def _until_disconnect(request: Request, job: Job, work: Any) -> Any:
    """Await `work`; if the client disconnects first, cancel the job's rows at once."""
    task = asyncio.ensure_future(work)

    def stop() -> None:
        job.cancel()
        task.cancel()

    return await _unless_client_leaves(request, task, stop)


async def _unless_client_leaves(
    request: Request, task: asyncio.Future[Any], stop: Callable[[], None], wait: bool = False
) -> Any:
    """`task`'s result; if the client disconnects first (or the request is cancelled),
    `stop()` and answer 499 (`wait`: once the task has ended)."""
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        stop()
        raise
    finally:
        watcher.cancel()
    if task not in done:
        stop()
        if wait:
            with contextlib.suppress(Cancelled, ApiError, asyncio.CancelledError):
                await task
        return JSONResponse({}, status_code=499)  # nobody is listening
    return task.result()


def _sse(chunks: AsyncIterator[dict[str, Any]], job: Job) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            job.cancel()  # no-op when finished; frees the rows of a client that left
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


# ---- chat ---------------------------------------------------------------------------------


def _logprob_entry(served: ServedModel, lp: Any) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        piece = served.piece(token_id)
        return {
            "token": piece.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(piece),
        }

    return {
        **one(lp.token_id, lp.raw_logprob),
        "top_logprobs": [one(i, v) for i, v in lp.raw_top],
    }


def _extension(done: Finished) -> dict[str, Any]:
    """muestra's per-choice extension: enough to replay and to store the sample."""
    return {
        "seed": done.sample.seed,
        "reasoning_tokens": done.reasoning_tokens,
        "budget_hit": done.budget_hit,
        "completion_tokens": len(done.sample.token_ids),
        # every token the choice generated, in order: reasoning, closing text, answer and
        # the token that ended it (the text leaves out that one and what follows a stop)
        "token_ids": [int(t) for t in done.sample.token_ids],
    }


def _usage(job: Job, finished: dict[int, Finished]) -> dict[str, Any]:
    completion = sum(len(f.sample.token_ids) for f in finished.values())
    reasoning = sum(f.reasoning_tokens for f in finished.values())
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _head(job: Job, prefix: str, kind: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{job.id}",
        "object": kind,
        "created": job.created,
        "model": job.served.name,
    }


class _Follow:
    """A job's samples as text, updated batch by batch (`batches` yields the choices that
    got tokens), for whole responses and streams alike."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.texts = [SampleText(job.hold) for _ in range(job.choices)]
        self.finished: dict[int, Finished] = {}

    async def batches(self) -> AsyncIterator[list[int]]:
        async for batch in self.job.records():
            touched: dict[int, None] = {}
            for record in batch:
                if isinstance(record, TokenRecord):
                    self.texts[record.choice].add(
                        self.job.served.piece(record.token_id), record.channel, record.logprobs
                    )
                    touched[record.choice] = None
                elif isinstance(record, Finished):
                    self.finished[record.choice] = record
            yield list(touched)

    def take(self, index: int) -> tuple[dict[str, str], Finished | None]:
        """New text of a choice (all of it, cut at its stop string, once it finished)."""
        done = self.finished.get(index)
        cut = done.sample.stop_byte_offset if done else None
        return self.texts[index].take(final=done is not None, cut=cut), done


async def _joined(
    chunks: AsyncIterator[dict[str, Any]],
    choices: list[dict[str, Any]],
    merge: Callable[[dict[str, Any], dict[str, Any]], None],
) -> Any:
    """Join a stream into whole `choices` (`merge(choice, chunk's choice)`); its usage."""
    usage = None
    async for chunk in chunks:
        if chunk["choices"]:
            part = chunk["choices"][0]
            merge(choices[part["index"]], part)
        else:
            usage = chunk["usage"]
    return usage


async def _chat_response(job: Job, body: ChatRequest) -> dict[str, Any]:
    """The whole reply: the stream's chunks joined (one formatter, so a streamed and an
    unstreamed reply carry the same text, reasoning, logprobs and extension)."""
    text_mode = body.muestra is not None and body.muestra.think_mode == "text"
    with_reasoning = job.served.tags is not None or text_mode
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": ""}
            | ({"reasoning_content": ""} if with_reasoning else {}),
            "logprobs": {"content": []} if body.logprobs else None,
            "finish_reason": None,
        }
        for index in range(job.choices)
    ]

    def merge(choice: dict[str, Any], part: dict[str, Any]) -> None:
        for key in ("content", "reasoning_content"):
            if part["delta"].get(key) and key in choice["message"]:
                choice["message"][key] += part["delta"][key]
        if part["logprobs"] is not None:
            choice["logprobs"]["content"] += part["logprobs"]["content"]
        if part["finish_reason"] is not None:
            choice["finish_reason"] = part["finish_reason"]
            choice["muestra"] = part["muestra"]

    usage = await _joined(_chat_chunks(job, body, include_usage=True), choices, merge)
    return {
        **_head(job, "chatcmpl", "chat.completion"),
        "system_fingerprint": f"muestra-{__version__}",
        "choices": choices,
        "usage": usage,
    }


async def _chat_chunks(
    job: Job, body: ChatRequest, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    served = job.served

    def chunk(index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        data = {
            **_head(job, "chatcmpl", "chat.completion.chunk"),
            "system_fingerprint": f"muestra-{__version__}",
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}],
        }
        data["choices"][0].update(extra)
        if include_usage:
            data["usage"] = None
        return data

    follow = _Follow(job)
    for index in range(job.choices):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for touched in follow.batches():
        for index in touched:
            out, done = follow.take(index)
            delta = {}
            if out["reasoning"]:
                delta["reasoning_content"] = out["reasoning"]
            if out["content"]:
                delta["content"] = out["content"]
            logprobs = None
            if body.logprobs:
                new = follow.texts[index].take_logprobs()
                if new:
                    logprobs = {"content": [_logprob_entry(served, lp) for lp in new]}
            if delta or logprobs:
                yield chunk(index, delta, logprobs=logprobs)
            if done is not None:
                yield chunk(
                    index, {}, finish_reason=done.sample.finish_reason, muestra=_extension(done)
                )
    if include_usage:
        yield {
            **_head(job, "chatcmpl", "chat.completion.chunk"),
            "choices": [],
            "usage": _usage(job, follow.finished),
        }


# ---- text completions ---------------------------------------------------------------------


def _legacy_logprobs(served: ServedModel, entries: list[Any], offset: int = 0) -> dict[str, Any]:
    """/v1/completions' logprobs of `entries`, the first at character `offset`."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in entries:
        piece = served.piece(lp.token_id).decode("utf-8", errors="replace")
        tokens.append(piece)
        token_logprobs.append(lp.raw_logprob)
        top.append({served.piece(i).decode("utf-8", errors="replace"): v for i, v in lp.raw_top})
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


async def _text_response(job: Job, body: CompletionRequest) -> dict[str, Any]:
    """The whole reply: the stream's chunks joined (see `_chat_response`)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    choices = [
        {
            "index": index,
            "text": "",
            "logprobs": {key: [] for key in keys} if body.logprobs is not None else None,
            "finish_reason": None,
        }
        for index in range(job.choices)
    ]

    def merge(choice: dict[str, Any], part: dict[str, Any]) -> None:
        choice["text"] += part["text"]
        if part["logprobs"] is not None:
            for key in keys:
                choice["logprobs"][key] += part["logprobs"][key]
        if part["finish_reason"] is not None:
            choice["finish_reason"] = part["finish_reason"]

    usage = await _joined(_text_chunks(job, body, include_usage=True), choices, merge)
    return {
        **_head(job, "cmpl", "text_completion"),
        "choices": choices,
        "usage": usage,
    }


async def _text_chunks(
    job: Job, body: CompletionRequest, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    served = job.served

    def chunk(
        index: int, text: str, logprobs: Any = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            **_head(job, "cmpl", "text_completion"),
            "choices": [
                {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if include_usage:
            data["usage"] = None
        return data

    follow = _Follow(job)
    offsets = [0] * job.choices  # text_offset continues across a choice's chunks
    async for touched in follow.batches():
        for index in sorted(touched):
            out, done = follow.take(index)
            logprobs = None
            if body.logprobs is not None:
                new = follow.texts[index].take_logprobs()
                if new:
                    logprobs = _legacy_logprobs(served, new, offsets[index])
                    offsets[index] += sum(len(token) for token in logprobs["tokens"])
            if out["content"] or logprobs:
                yield chunk(index, out["content"], logprobs)
            if done is not None:
                yield chunk(index, "", finish_reason=done.sample.finish_reason)
    if include_usage:
        yield {
            **_head(job, "cmpl", "text_completion"),
            "choices": [],
            "usage": _usage(job, follow.finished),
        }
