"""Exactness under sustained load (issue 47, item 7): `muestra serve` on the real SmolLM2
GGUF (llama.cpp, exact batching) under 16 clients that each send seeded 200-token
completions back to back for `--minutes`, so the scheduler never idles; then a random
subset of those requests is sent again, one at a time on the idle server, and each
reply's tokens and log-probabilities are compared with the reply under load.

`python -m benchmarks.sustained_load --minutes 10` prints one JSON object: requests and
tokens served, /health's KV counters (cells reused under live rows, size, budget), and
how many replayed replies were the same bits. Loopback only; the server is this
script's child and ends with it.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from typing import Any

CLIENTS = 16
MAX_TOKENS = 200
TOPICS = ("a dragon", "the sea", "a lost key", "two friends", "a storm", "an old map",
          "a robot", "a garden")  # fmt: skip


def body(client: int, k: int) -> dict[str, Any]:
    topic = TOPICS[(client + k) % len(TOPICS)]
    return {"model": "smol", "prompt": f"Once upon a time, {topic}", "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": 1000 * client + k, "logprobs": 1}  # fmt: skip


def reply_bits(reply: dict[str, Any]) -> tuple[str, list[float]]:
    choice = reply["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--replay", type=int, default=40, help="Requests sent again alone.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-memory", default=None, help="muestra serve --max-memory")
    args = parser.parse_args()

    import httpx

    import muestra.notebook as mn
    from muestra.models.kit import ensure_kit

    kit = ensure_kit("smollm2-135m-instruct")
    (gguf,) = kit.glob("*.gguf")
    flags: dict[str, Any] = {"threads": args.threads, "served_model_name": "smol",
                             "max_batch": CLIENTS}  # fmt: skip
    if args.max_memory:
        flags["max_memory"] = args.max_memory
    served: dict[tuple[int, int], tuple[str, list[float]]] = {}
    errors: list[str] = []
    with mn.serve(gguf, **flags) as server:
        url = server.url + "/v1"
        deadline = time.monotonic() + 60 * args.minutes

        def client(c: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                k = 0
                while time.monotonic() < deadline:
                    reply = http.post("/completions", json=body(c, k))
                    if reply.status_code != 200:
                        errors.append(f"{reply.status_code}: {reply.text[:200]}")
                    else:
                        served[(c, k)] = reply_bits(reply.json())
                    k += 1

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        health = httpx.get(server.url + "/health").json()
        chosen = random.Random(0).sample(sorted(served), min(args.replay, len(served)))
        same = 0
        with httpx.Client(base_url=url, timeout=600) as http:
            for c, k in chosen:
                alone = reply_bits(http.post("/completions", json=body(c, k)).json())
                same += alone == served[(c, k)]
    tokens = sum(len(lps) for _, lps in served.values())
    print(json.dumps({
        "clients": CLIENTS, "max_tokens": MAX_TOKENS, "seconds": round(seconds, 1),
        "requests": len(served), "errors": len(errors), "first_errors": errors[:3],
        "tokens": tokens, "tokens_per_second": round(tokens / seconds, 1),
        "kv_cells_reused": health.get("kv_cells_reused"), "kv_cells": health.get("kv_cells"),
        "kv_cells_budget": health.get("kv_cells_budget"),
        "replayed": len(chosen), "replayed_same_bits": same,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
