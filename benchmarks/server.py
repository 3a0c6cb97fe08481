"""`muestra serve` against the in-process engine, on the same model and the same work.

Work: 32 chat requests (the seed-000 prompt, seeds 0…31, temperature 1, 32 tokens each
with `ignore_eos`, so every request costs the same whatever the random weights say).

- in-process: the 32 requests as one `Engine.generate` call, with the same phase
  controller the server builds for a chat request (the floor for this work);
- server, 32 concurrent clients: a real `muestra serve` process on loopback, 32
  requests sent at once over HTTP (they join the running batch as they arrive);
- server, one at a time: the same requests sent sequentially (what serving without
  continuous batching costs); measured on 8 requests and scaled to 32.

The server process and this process never compute at the same time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import seed_000_messages
from muestra.models.loading import LoadedModel

REQUESTS = 32
TOKENS = 32
SEQUENTIAL = 8


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _body(seed: int) -> dict[str, Any]:
    return {
        "model": "bench",
        "messages": seed_000_messages(),
        "max_tokens": TOKENS,
        "seed": seed,
        "temperature": 1.0,
        "ignore_eos": True,
    }


def _start(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    process = subprocess.Popen(
        [sys.executable, "-m", "muestra", "serve", str(model_dir), "--port", str(port),
         "--dtype", "bfloat16", "--device", "cpu", "--served-model-name", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("muestra serve did not start")


async def _concurrent(base: str, seeds: list[int]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=600) as client:
        replies = await asyncio.gather(
            *(client.post(f"{base}/v1/chat/completions", json=_body(s)) for s in seeds)
        )
    for reply in replies:
        reply.raise_for_status()
    return [r.json() for r in replies]


def _sequential(base: str, seeds: list[int]) -> None:
    with httpx.Client(timeout=600) as client:
        for seed in seeds:
            client.post(f"{base}/v1/chat/completions", json=_body(seed)).raise_for_status()


def _in_process(loaded: LoadedModel) -> Any:
    from muestra.answers.phases import AnswerConfig, PhaseController, ThinkConfig
    from muestra.answers.structured import StructuredGenerator
    from muestra.engine import Engine, GenerationRequest, SamplingParams

    generator = StructuredGenerator(loaded)
    engine = Engine.from_loaded(loaded, max_batch=64)
    tags = generator.tag_ids(ThinkConfig())
    params = SamplingParams(temperature=1.0)
    prompt = generator.text.encode_messages(seed_000_messages())
    requests = [
        GenerationRequest(prompt, params=params, max_new_tokens=TOKENS, seeds=[s], ignore_eos=True)
        for s in range(REQUESTS)
    ]

    def run() -> list[list[Any]]:
        hook = PhaseController(
            ThinkConfig(params=params, budget=TOKENS),
            AnswerConfig(params=params, max_tokens=TOKENS),
            tags,
            loaded.eos_token_ids,
        )
        return engine.generate(requests, hook)

    return run


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_server(loaded: LoadedModel, model_dir: Path, repeats: int) -> dict[str, Any]:
    """In-process and server runs alternate (this shared machine drifts by ±20% over
    minutes), and the overhead is the median of the ratios of neighbouring runs."""
    in_process = _in_process(loaded)
    process, base = _start(model_dir)
    seeds = list(range(REQUESTS))
    try:
        in_process()  # warm-up, both sides
        asyncio.run(_concurrent(base, [0, 1]))
        local_runs, server_runs = [], []
        for _ in range(max(repeats, 3)):
            local_runs.append(_timed(in_process))
            server_runs.append(_timed(lambda: asyncio.run(_concurrent(base, seeds))))
        replies = asyncio.run(_concurrent(base, seeds))
        health = httpx.get(f"{base}/health").json()
        sequential_s = _timed(lambda: _sequential(base, seeds[:SEQUENTIAL]))
        neighbour_s = _timed(lambda: asyncio.run(_concurrent(base, seeds)))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    local = in_process()
    same = sum(
        reply["usage"]["completion_tokens"] == TOKENS
        and reply["choices"][0]["muestra"]["seed"] == samples[0].seed
        for reply, samples in zip(replies, local, strict=True)
    )
    ratios = [s / loc for s, loc in zip(server_runs, local_runs, strict=True)]
    sequential_32 = sequential_s * REQUESTS / SEQUENTIAL
    return {
        "requests": REQUESTS,
        "tokens_each": TOKENS,
        "in_process_s": statistics.median(local_runs),
        "in_process_runs": local_runs,
        "server_concurrent_s": statistics.median(server_runs),
        "server_concurrent_runs": server_runs,
        "server_overhead": statistics.median(ratios),
        "server_overhead_per_pair": ratios,
        "server_one_at_a_time_s_scaled_to_32": sequential_32,
        "continuous_batching_speedup": sequential_32 / neighbour_s,
        "max_rows_in_a_step": health["max_rows_in_a_step"],
        "replies_with_all_tokens_and_same_seed": same,
    }
