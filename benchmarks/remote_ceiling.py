"""The remote backend's own ceiling: one runner against endpoints that answer at once.

    python -m benchmarks.remote_ceiling [--samples 100000] [--concurrency 64]

1. The fake endpoint alone (`benchmarks/fake_endpoint.py`, one process serving 8 loopback
   ports): requests/s from `wrk` when it is installed, and from a raw-socket client in this
   process — the runner is measured against it only if it is several times faster than the
   runner, so that the numbers below are the runner's, not the endpoint's.
2. One runner (`muestra.experiments.runner.Runner`, in this process, as `muestra run` drives
   it) over 1 endpoint, then over the pool of 8: a spec of 2 prompts × samples/2, a think
   phase (mode "tags", budget 64) and the seed's Character schema, so every answer is
   parsed and validated before it is stored. Measured: samples/s sent (requests the
   endpoints answered, from their own counters), received and validated (rows stored with
   no error, i.e. parsed and valid under the schema) and stored (rows committed, read back
   from the store), and the runner's resident memory (VmRSS) sampled every 0.25 s through
   the run: its start, its peak and its growth between 10 % and 100 % of the samples.

Writes benchmarks/results/remote_ceiling.json. Profile a run with py-spy (in the dev
extra):
    py-spy record -r 250 -f speedscope -o remote.json -- \
        python -m benchmarks.remote_ceiling --samples 20000 --only 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPEC = """
name = "ceiling"
seed = 7
samples = {samples}

[model]
id = "fake"
endpoint = {endpoints}
concurrency = {concurrency}

[prompt]
system = "You build role-playing characters. Answer in JSON."
user = "Create a character for this description:\\n<{{description}}>"

[[prompt.items]]
id = "strong"
description = "I am a strong person, with a lot of charisma and a gift for leadership."

[[prompt.items]]
id = "friendly"
description = "I am a friendly person who cares about my companions."

[think]
mode = "tags"
budget = 64
temperature = 0.8
top_p = 0.95
top_k = 0
min_p = 0.0

[answer]
max_tokens = 80
field_probs = false
schema = "character.schema.json"
"""


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc status")


def start_fake(ports: int) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fake_endpoint", "--ports", str(ports)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    urls = [process.stdout.readline().strip() for _ in range(ports)]
    assert all(u.startswith("http://") for u in urls), urls
    return process, urls


def answered(urls: list[str]) -> int:
    """Chat requests the fake endpoint process answered so far (all its ports)."""
    return httpx.get(urls[0].removesuffix("/v1") + "/stats").json()["chat"]


# ---- 1. the endpoint alone ---------------------------------------------------------------


def wrk_rate(url: str, seconds: int = 5) -> float | None:
    if shutil.which("wrk") is None:
        return None
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    script.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", "-s", str(script), f"{url}/chat/completions"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script.unlink()
    return float(next(line for line in out.splitlines() if "Requests/sec" in line).split()[1])


async def _raw_client(url: str, connections: int, seconds: float) -> float:
    """Requests/s of `connections` keep-alive sockets, each sending the next request as soon
    as the previous answer is read (no HTTP library: only the endpoint's cost shows)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    body = b'{"model":"fake","messages":[{"role":"user","content":"hi"}]}'
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json"
        f"\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    done = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            done += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return done / (time.perf_counter() - started)


# ---- 2. the runner -----------------------------------------------------------------------


def run_once(urls: list[str], samples: int, concurrency: int, folder: Path) -> dict[str, Any]:
    from muestra.experiments.runner import Runner
    from muestra.experiments.spec import load_spec

    shutil.copy(EXAMPLES / "character.schema.json", folder / "character.schema.json")
    spec_path = folder / "ceiling.toml"
    spec_path.write_text(
        SPEC.format(samples=samples // 2, endpoints=json.dumps(urls), concurrency=concurrency)
    )
    store = folder / "ceiling.db"
    trace: list[tuple[float, float, int]] = []  # (seconds, RSS MB, stored)
    done = [0]
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            trace.append((time.perf_counter() - started, rss_mb(), done[0]))
            time.sleep(0.25)

    sent_before = answered(urls)
    runner = Runner(load_spec(spec_path), store, on_note=lambda _: None)
    runner.open()
    rss_start = rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        progress = runner.run(lambda p: done.__setitem__(0, p.done))
    finally:
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        running.clear()
        watcher.join()
        runner.close()
    sent = answered(urls) - sent_before
    with sqlite3.connect(store) as db:
        stored, valid = db.execute(
            "SELECT count(*), sum(error IS NULL AND answer_json IS NOT NULL) FROM samples"
        ).fetchone()
        per_endpoint = dict(db.execute("SELECT endpoint, count(*) FROM samples GROUP BY 1"))
    assert progress.done == stored == samples, (progress.done, stored, samples)
    return {
        "endpoints": len(urls),
        "samples": samples,
        "concurrency_per_endpoint": concurrency,
        "seconds": round(seconds, 2),
        "sent_per_s": round(sent / seconds, 1),
        "received_per_s": round(progress.done / seconds, 1),
        "validated_per_s": round(valid / seconds, 1),
        "stored_per_s": round(stored / seconds, 1),
        # the runner's own CPU per sample: its ceiling on one free core, whatever else runs
        "cpu_us_per_sample": round(cpu / samples * 1e6),
        "one_free_core_ceiling_per_s": round(samples / cpu),
        "valid": valid,
        "rows_per_endpoint": sorted(per_endpoint.values()),
        **_memory(trace, rss_start, samples),
    }


def _memory(trace: list[tuple[float, float, int]], start: float, samples: int) -> dict[str, Any]:
    """The runner's RSS at start, at 10 % of the samples, at its peak and at the end, and
    about 40 points of the trace (seconds, MB, samples stored)."""
    tenth = next((rss for _, rss, n in trace if n >= samples // 10), start)
    return {
        "rss_mb": {
            "at_start": round(start, 1),
            "at_10_percent": round(tenth, 1),
            "peak": round(max((r for _, r, _ in trace), default=start), 1),
            "at_end": round(trace[-1][1] if trace else start, 1),
        },
        "trace": [(round(t, 2), round(r, 1), n) for t, r, n in trace[:: max(1, len(trace) // 40)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="the remote backend's ceiling")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64, help="slots per endpoint")
    parser.add_argument("--only", type=int, choices=(1, 8), help="one pool size only")
    parser.add_argument("--skip-alone", action="store_true", help="skip step 1")
    args = parser.parse_args()
    os.environ.setdefault("MUESTRA_MAX_SAMPLES", str(args.samples))
    fake, urls = start_fake(8)
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(),
                              "cpus": os.cpu_count(), "runs": []}  # fmt: skip
    try:
        if not args.skip_alone:
            alone = {
                "wrk_64_connections": wrk_rate(urls[0]),
                "raw_client_64_connections": round(asyncio.run(_raw_client(urls[0], 64, 5)), 1),
            }
            result["endpoint_alone_requests_per_s"] = alone
            print(f"fake endpoint alone: {alone} requests/s", flush=True)
        for pool in (1, 8) if args.only is None else (args.only,):
            with tempfile.TemporaryDirectory() as folder:
                run = run_once(urls[:pool], args.samples, args.concurrency, Path(folder))
            result["runs"].append(run)
            shown = {k: v for k, v in run.items() if k != "trace"}
            print(json.dumps(shown), flush=True)
    finally:
        fake.terminate()
        fake.wait()
    if args.samples >= 100_000 and args.only is None:
        (RESULTS / "remote_ceiling.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
