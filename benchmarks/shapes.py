"""Real shapes (issue 42): Qwen3-1.7B and Qwen3-4B with random weights, turned into GGUFs
by llama.cpp's own converter and quantizer, measured on muestra's llama.cpp runtime beside
llama.cpp's own programs, 2 threads.

Speed and memory depend on the shapes and the quantization, not on the weights' values,
so the kit's random-weight presets (`qwen3-1.7b`, `qwen3-4b`: the published configs, bf16)
stand in for the real models, which cannot be installed here:

1. **GGUFs**: `convert_hf_to_gguf.py --outtype bf16` of the llama.cpp that the installed
   llama-cpp-python vendors, then `llama-quantize` to Q8_0 and Q4_K_M (cached under
   muestra's cache folder, `shapes/`; the bf16 file is removed once both are made).
2. **Memory, planned against llama.cpp's own numbers**: the KV bytes per token and the
   weights that muestra's memory plan reads from the GGUF, against the published shape's
   arithmetic and against what llama.cpp's log says it allocated for a context of
   muestra's runtime (its KV cache size and cells, its model size); and the output and
   compute buffers the plan counts against the logged ones, exact and free batching, at
   4,096 and 16,384 cells.
3. **Peak resident memory against the plan**: `muestra run` in its own process on seed
   000's workload shape (2 prompts × `--rows` samples, a sampled think budget, the
   Character schema answer), its stored memory plan against the process's peak RSS
   (`getrusage` of the child), and with a `--max-memory` of half the planned KV: the rows
   it admitted at once.
4. **Decoding against llama-batched-bench**: batch-1 greedy decoding and `--speed-rows`
   sampled rows (8 and 32) of seed 000's prompt (exact and free batching) against
   `llama-batched-bench -npl 1,8,32` (flash attention off, its fastest here; `-pps -kvu`
   as muestra shares the prompt and one cache).
5. **Seed 000's answer workload against llama-server** (`--parts server`): the English
   Character spec without reasoning (a think budget that closes the reasoning and then
   samples the answer apart is muestra serve's own request extension, which llama-server
   ignores), 2 prompts × `--rows` samples at T 1 under the schema, stored: muestra's
   llama.cpp runtime (exact with `field_probs`, and free) against muestra's remote
   backend sending them to `llama-server -np ROWS` with the same GGUF.
6. **How cost grows** (`--parts curve`, Qwen3-0.6B and 4B shapes): that workload at 1, 8,
   32 and 128 samples per prompt (`--curve-max qwen3-4b=32` to stop a preset earlier),
   samples/s and peak RSS, drawn into docs/images/cost-curve.png.
7. **The q8_0 KV cache's speed** (`--parts kv`): exact batching's decoding rates with the
   f16 cache and with q8_0, as in 4.

`python -m benchmarks.shapes [--presets qwen3-4b] [--quant Q4_K_M] [--rows 8]`, or
`make bench BENCH_ARGS="--only shapes"`. The 4B kit needs ~8 GB of disk for its bf16
safetensors and as much again while converting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, seed_000_messages, write_result
from benchmarks.llamacpp import NEW_TOKENS, batched_bench, server_workload
from benchmarks.peers import build_peers

THREADS = 2
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "images" / "cost-curve.png"
PRESETS = ("qwen3-1.7b", "qwen3-4b")
CURVE_PRESETS = ("qwen3-0.6b", "qwen3-4b")  # the cost curve's shapes (--parts curve)
CURVE_COUNTS = (1, 8, 32, 128)  # samples per prompt on the cost curve
QUANTS = ("Q8_0", "Q4_K_M")
# the published shapes: (layers, KV heads, head_dim) → f16 KV bytes per token
PUBLISHED_KV = {"qwen3-0.6b": 28 * 8 * 2 * 128 * 2, "qwen3-1.7b": 28 * 8 * 2 * 128 * 2,
                "qwen3-4b": 36 * 8 * 2 * 128 * 2}  # fmt: skip


def shapes_dir() -> Path:
    from muestra.paths import cache_dir

    return cache_dir() / "shapes"


def make_ggufs(preset: str, kit_root: Path | None) -> dict[str, Path]:
    """`preset`'s GGUFs in each of QUANTS, converted and quantized by llama.cpp (once)."""
    from muestra.models.kit import ensure_kit

    folder = shapes_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = {quant: folder / f"{preset}-{quant}.gguf" for quant in QUANTS}
    if all(path.is_file() for path in out.values()):
        return out
    peers = build_peers()
    source = peers["llama-server"].parents[2] / "source"
    kit = ensure_kit(preset, kit_root / preset if kit_root else None)
    full = folder / f"{preset}-bf16.gguf"
    if not full.is_file():
        print(f"converting {preset} to GGUF (bf16) with llama.cpp's convert_hf_to_gguf.py …")
        partial = full.with_suffix(".partial")
        done = subprocess.run(
            [sys.executable, str(source / "convert_hf_to_gguf.py"), str(kit),
             "--outtype", "bf16", "--outfile", str(partial)],
            capture_output=True, text=True, env=converter_env(folder),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        partial.rename(full)
    for quant, path in out.items():
        if not path.is_file():
            print(f"quantizing {preset} to {quant} with llama-quantize …")
            partial = path.with_suffix(".partial")
            subprocess.run(
                [str(peers["llama-quantize"]), str(full), str(partial), quant, str(THREADS)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            partial.rename(path)
    full.unlink()
    return out


def converter_env(folder: Path) -> dict[str, str]:
    """The environment llama.cpp's converter runs in: muestra's, plus the one package of its
    requirements muestra does not install (sentencepiece: the Qwen converter imports it
    before it falls back to the BPE tokenizer), installed aside under `folder` so that
    muestra's own environment does not change."""
    deps = folder / "convert-deps"
    if not (deps / "sentencepiece").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps),
             "sentencepiece>=0.1.98,<0.3.0"],
            check=True,
        )  # fmt: skip
    return {**os.environ, "PYTHONPATH": str(deps)}


# one context of muestra's llama.cpp runtime, made in a child with llama.cpp's log on
CONTEXT_LOG = """
import sys
from pathlib import Path
from muestra.models.runtime.llamacpp_runtime import LlamaCppRuntime
runtime = LlamaCppRuntime(Path(sys.argv[1]), threads=2, exact=sys.argv[2] == "exact")
runtime._new_context(int(sys.argv[3]))
"""


def llama_cpp_sizes(gguf: Path, cells: int, mode: str) -> dict[str, float]:
    """What llama.cpp says it allocated for `gguf` in a `cells`-cell context of muestra's
    runtime (`mode`: exact or free batching): its model buffer, its KV cache (MiB, and
    bytes per cell), its output and compute buffers (MiB), from its own log."""
    done = subprocess.run(
        [sys.executable, "-c", CONTEXT_LOG, str(gguf), mode, str(cells)],
        capture_output=True, text=True, check=True, env={**os.environ, "MUESTRA_LLAMA_LOG": "1"},
    )  # fmt: skip
    log = done.stderr
    kv = re.search(r"llama_kv_cache: size =\s*([0-9.]+) MiB \(\s*(\d+) cells", log)
    model = re.search(r"model buffer size =\s*([0-9.]+) MiB", log)
    output = re.search(r"CPU +output buffer size =\s*([0-9.]+) MiB", log)
    compute = re.search(r"CPU compute buffer size =\s*([0-9.]+) MiB", log)
    assert kv and model and output and compute, log[-3000:]
    kv_mib, kv_cells = float(kv.group(1)), int(kv.group(2))
    return {
        "model_buffer_mib": float(model.group(1)),
        "kv_cache_mib": kv_mib,
        "kv_cells": kv_cells,
        "kv_bytes_per_cell": kv_mib * 2**20 / kv_cells,
        "output_buffer_mib": float(output.group(1)),
        "compute_buffer_mib": float(compute.group(1)),
    }


def planned_buffers(gguf: Path, cells: int, mode: str) -> dict[str, float]:
    """The output and compute buffers muestra's plan counts for that context (MiB)."""
    from muestra.experiments.planning import llama_cache
    from muestra.models.gguf_header import read_gguf_header
    from muestra.models.memory import llama_buffers_from_gguf

    buffers = llama_buffers_from_gguf(read_gguf_header(gguf))
    cache = llama_cache(mode == "exact")
    compute = buffers.compute_bytes(cells, *cache.shape)
    return {
        "output_buffer_mib": buffers.output_bytes(cache.outputs) / 2**20,
        "compute_buffer_mib": compute / 2**20,
    }


def planned_sizes(gguf: Path) -> dict[str, int]:
    """What muestra's memory plan reads from the GGUF (models/memory.py)."""
    from muestra.models.gguf_header import read_gguf_header
    from muestra.models.memory import gguf_weights_bytes, kv_bytes_per_token_from_gguf

    header = read_gguf_header(gguf)
    return {
        "kv_bytes_per_token": kv_bytes_per_token_from_gguf(header),
        "weights_bytes": gguf_weights_bytes(header),
        "file_bytes": gguf.stat().st_size,
    }


def workload_spec(
    folder: Path, gguf: Path, rows: int, max_memory: str | None, think: bool = True
) -> Path:
    """Seed 000's workload shape: the English Character spec, 2 prompts × `rows` samples,
    a think budget of 64 sampled tokens (`think`), the schema answer at T 1."""
    import tomllib

    from muestra.experiments.toml_text import dump_toml

    source = Path(__file__).resolve().parents[1] / "src" / "muestra" / "data"
    data = tomllib.loads((source / "characters.toml").read_text("utf-8"))
    data["samples"] = rows
    data["model"] = {"id": str(gguf), "runtime": "llamacpp", "threads": THREADS}
    data["think"] = {"budget": 64, "temperature": 0.6}
    if not think:
        data.pop("think")
    data["answer"] = {"temperature": 1.0, "max_tokens": 80, "field_probs": False,
                      "schema": str(source / "character.schema.json")}  # fmt: skip
    if max_memory:
        data["run"] = {"max_memory": max_memory}
    path = folder / f"workload-{len(list(folder.glob('*.toml')))}.toml"
    path.write_text(dump_toml(data), "utf-8")
    return path


# `muestra run` in a child that reports its own peak resident memory (VmHWM) at exit
RUN_AND_REPORT_PEAK = """
import sys
from muestra.cli.app import app
try:
    app(sys.argv[1:], prog_name="muestra", standalone_mode=False)
finally:
    status = open("/proc/self/status").read()
    peak = [line for line in status.splitlines() if line.startswith("VmHWM:")][0]
    print("peak_kib", int(peak.split()[1]), file=sys.stderr)
"""


def peak_against_plan(
    gguf: Path, rows: int, folder: Path, max_memory: str | None, think: bool = True
) -> dict:
    """One `muestra run` of the workload in its own process: its stored plan, its peak
    resident memory, and the rows it ran at once."""
    spec = workload_spec(folder, gguf, rows, max_memory, think)
    store = folder / f"{spec.stem}.db"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT_PEAK, "run", str(spec), "--out", str(store),
         "--batch", str(2 * rows)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    peak = re.search(r"^peak_kib (\d+)$", done.stderr, re.M)
    assert done.returncode == 0 and peak, done.stderr[-3000:]
    peak_bytes = int(peak.group(1)) * 1024
    db = sqlite3.connect(store)
    (plan,) = [json.loads(r[0]) for r in db.execute("SELECT plan_json FROM memory_plans")]
    samples = db.execute("SELECT count(*) FROM samples").fetchone()[0]
    db.close()
    run = re.search(r"^done: .* in ([0-9.]+)s", done.stderr, re.M)
    return {
        "run_seconds": float(run.group(1)) if run else None,
        "max_memory": max_memory,
        "samples": samples,
        "seconds": seconds,
        "rows_asked": plan["rows_asked"],
        "rows_at_once": plan["rows"],
        "planned_peak_bytes": plan["peak_bytes"],
        "planned_kv_bytes_per_row": plan["kv_bytes_per_row"],
        "planned_weights_bytes": plan["weights_bytes"],
        "planned_buffer_bytes": plan.get("buffer_bytes"),
        "planned_kv_cells": plan.get("kv_cells"),
        "planned_tokens_per_row": plan["tokens_per_row"],
        "planned_kv_bytes_per_token": plan["kv_bytes_per_token"],
        "planned_held_bytes": plan["held_bytes"],
        "measured_peak_rss_bytes": peak_bytes,
        "peak_over_plan": peak_bytes / plan["peak_bytes"],
        "peak_within_budget": peak_bytes <= plan["budget_bytes"],
        "planned_reserve_bytes": plan.get("reserve_bytes"),
        "plan_note": next((line for line in done.stderr.splitlines() if "memory plan" in line), ""),
    }


def cost_curve(preset: str, gguf: Path, counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """How cost grows: the workload without its think phase (the answer under the schema)
    at each count of samples per prompt, one `muestra run` each in its own process:
    samples/s (the run's own time, the model's load included) and peak RSS."""
    points = []
    with tempfile.TemporaryDirectory() as folder:
        for count in counts:
            print(f"{preset}: {count} samples per prompt …", flush=True)
            run = peak_against_plan(gguf, count, Path(folder), None, think=False)
            points.append({
                "samples_per_prompt": count,
                "samples": run["samples"],
                "run_seconds": run["run_seconds"],
                "samples_per_s": run["samples"] / run["run_seconds"],
                "measured_peak_rss_bytes": run["measured_peak_rss_bytes"],
                "planned_peak_bytes": run["planned_peak_bytes"],
                "rows_at_once": run["rows_at_once"],
            })  # fmt: skip
    return points


def plot_curve(result: dict[str, Any], path: Path) -> Path:
    """The cost curve as a figure: samples/s and peak RSS against samples per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate, memory) = plt.subplots(1, 2, figsize=(9, 3.4))
    for preset, points in result.items():
        counts = [p["samples_per_prompt"] for p in points]
        label = preset.replace("qwen3-", "Qwen3-").replace("b", "B") + " Q4_K_M"
        rate.plot(counts, [p["samples_per_s"] for p in points], "o-", label=label)
        memory.plot(counts, [p["measured_peak_rss_bytes"] / 2**30 for p in points], "o-",
                    label=label)  # fmt: skip
    for axis, title in ((rate, "samples/s (stored)"), (memory, "peak RSS (GiB)")):
        axis.set_xscale("log", base=2)
        measured = sorted({p["samples_per_prompt"] for points in result.values() for p in points})
        axis.set_xticks(measured, [str(c) for c in measured])
        axis.set_xlabel("samples per prompt (2 prompts)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    rate.legend()
    figure.suptitle("Seed 000's answer workload, llama.cpp runtime (exact), 2 threads", size=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def decode_rates(loaded: Any, prompt: list[int], rows: tuple[int, ...], repeats: int) -> dict:
    """muestra's batch-1 greedy decoding and each count of `rows` sampled rows of `prompt`
    (tokens/s, prefill excluded: the NEW_TOKENS run minus the 1-token run)."""
    from muestra.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine.from_loaded(loaded, max_batch=max(rows))

    def timed(n: int, many: int) -> float:
        params = SamplingParams(temperature=0) if many == 1 else SamplingParams(temperature=0.7)
        request = GenerationRequest(prompt, n=many, params=params, seed=1, max_new_tokens=n,
                                    ignore_eos=True)  # fmt: skip
        started = time.perf_counter()
        engine.generate([request])
        return time.perf_counter() - started

    out = {}
    for name, many in (("batch1", 1), *((f"rows{r}", r) for r in rows)):
        one = statistics.median(timed(1, many) for _ in range(repeats))
        full = statistics.median(timed(NEW_TOKENS, many) for _ in range(repeats))
        out[f"{name}_decode_tok_s"] = many * (NEW_TOKENS - 1) / (full - one)
    return out


def kv_cache_rates(gguf: Path, rows: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Exact batching's batch-1 greedy and `rows` sampled rows with the f16 KV cache and
    with q8_0 (34 bytes per 32 values: 53 % of f16's), one after the other, on seed 000's
    prompt."""
    from muestra.models.inspection import render_chat
    from muestra.models.loading import load_model

    rates: dict[str, Any] = {}
    for cache in ("f16", "q8_0"):
        loaded = load_model(str(gguf), runtime="llamacpp", threads=THREADS, kv_cache=cache)
        _, prompt = render_chat(loaded.tokenizer, seed_000_messages())
        rates[cache] = decode_rates(loaded, prompt, rows, repeats)
        del loaded
    rates["q8_0_vs_f16"] = {key: rates["q8_0"][key] / rates["f16"][key] for key in rates["f16"]}
    return rates


def batched_bench_rate(bench: Path, gguf: Path, prompt: int, npl: int, repeats: int) -> float:
    """`llama-batched-bench`'s generation rate (S_TG, tokens/s) for `npl` sequences, flash
    attention off (its fastest here): the median of `repeats` runs."""
    return statistics.median(batched_bench(bench, gguf, prompt, npl, "off") for _ in range(repeats))


def speed_against_bench(
    bench: Path, gguf: Path, quant: str, rows: tuple[int, ...], repeats: int
) -> dict:
    """Batch-1 greedy and each count of `rows` sampled rows, muestra (exact and free
    batching) against llama-batched-bench -npl 1,ROWS…, on seed 000's prompt."""
    from muestra.models.inspection import render_chat
    from muestra.models.loading import load_model

    speed: dict[str, Any] = {"quant": quant}
    for mode, exact in (("exact", True), ("free", False)):
        loaded = load_model(str(gguf), runtime="llamacpp", threads=THREADS,
                            batch_invariant=exact)  # fmt: skip
        _, prompt = render_chat(loaded.tokenizer, seed_000_messages())
        speed["prompt_tokens"] = len(prompt)
        speed[f"muestra_{mode}"] = decode_rates(loaded, prompt, rows, repeats)
        del loaded
    speed["llama_batched_bench"] = {
        f"npl{npl}": batched_bench_rate(bench, gguf, len(prompt), npl, repeats)
        for npl in (1, *rows)
    }
    for mode in ("exact", "free"):
        ours, theirs = speed[f"muestra_{mode}"], speed["llama_batched_bench"]
        speed[f"{mode}_batch1_vs_bench"] = ours["batch1_decode_tok_s"] / theirs["npl1"]
        for r in rows:
            speed[f"{mode}_rows{r}_vs_bench"] = ours[f"rows{r}_decode_tok_s"] / theirs[f"npl{r}"]
    return speed


def bench_shapes(
    presets: tuple[str, ...] = PRESETS,
    quants: tuple[str, ...] = QUANTS,
    rows: int = 8,
    repeats: int = 2,
    kit_root: Path | None = None,
    speed_quant: str = "Q4_K_M",
    parts: tuple[str, ...] = ("memory", "speed"),
    speed_rows: tuple[int, ...] = (8, 32),
    curve_max: dict[str, int] | None = None,
) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    curve_max = curve_max or {}
    peers = build_peers()
    bench = peers["llama-batched-bench"]
    result: dict[str, Any] = {"threads": THREADS, "new_tokens": NEW_TOKENS, "rows": rows}
    for preset in presets:
        ggufs = make_ggufs(preset, kit_root)
        entry: dict[str, Any] = {"published_kv_bytes_per_token": PUBLISHED_KV[preset]}
        result[preset] = entry
        gguf = ggufs[speed_quant]
        if "speed" in parts:
            entry["speed"] = speed_against_bench(bench, gguf, speed_quant, speed_rows, repeats)
        if "kv" in parts:
            entry["kv_cache_speed"] = kv_cache_rates(gguf, speed_rows, repeats)
            print(json.dumps({"kv_cache_speed": entry["kv_cache_speed"]}), flush=True)
        if "curve" in parts and preset in CURVE_PRESETS:
            counts = tuple(c for c in CURVE_COUNTS if c <= curve_max.get(preset, max(CURVE_COUNTS)))
            entry["cost_curve"] = cost_curve(preset, gguf, counts)
            print(json.dumps({"cost_curve": entry["cost_curve"]}), flush=True)
        if "server" in parts:
            # A run on a bare GGUF reads its tokenizer from muestra's cache after the first
            # (models/gguf.py: rebuilding it from the metadata takes ~45 s for Qwen3's
            # 151,936 tokens): the sides below are later runs, timed with it kept.
            from muestra.models.gguf import load_gguf_tokenizer

            started = time.perf_counter()
            load_gguf_tokenizer(gguf)
            entry["tokenizer_load_s"] = round(time.perf_counter() - started, 1)
            with tempfile.TemporaryDirectory() as folder:
                sides = ("exact", "free", "server")
                answers = server_workload(peers["llama-server"], gguf, Path(folder), 1, rows, sides)
            rate = answers["samples_per_s"]
            answers["exact_vs_server"] = rate["exact"] / rate["server"]
            answers["free_vs_server"] = rate["free"] / rate["server"]
            entry["seed000_answers"] = answers
        if "memory" not in parts:
            continue
        for quant in quants:
            gguf = ggufs[quant]
            entry[quant] = {"planned": planned_sizes(gguf),
                            "llama_cpp": llama_cpp_sizes(gguf, 4096, "exact")}  # fmt: skip
            if quant == speed_quant:  # the buffers, counted and allocated, by context
                entry["buffers"] = {
                    f"{mode}_{cells}": {"planned": planned_buffers(gguf, cells, mode),
                                        "llama_cpp": llama_cpp_sizes(gguf, cells, mode)}
                    for mode in ("exact", "free") for cells in (4096, 16384)
                }  # fmt: skip
        gguf = ggufs[speed_quant]
        from muestra.experiments.planning import llama_cache

        with tempfile.TemporaryDirectory() as folder:
            free = peak_against_plan(gguf, rows, Path(folder), None)
            print(json.dumps({"default_budget": free}), flush=True)
            # room for half the rows: the context of `rows` rows instead of 2 × `rows`, and
            # 64 MiB for what the process holds at planning (a few MiB more or less a run)
            half = llama_cache().cells(rows, free["planned_tokens_per_row"])
            fewer = (free["planned_kv_cells"] - half) * free["planned_kv_bytes_per_token"]
            budget = free["planned_peak_bytes"] - fewer + 64 * 2**20
            capped = peak_against_plan(gguf, rows, Path(folder), str(budget))
            print(json.dumps({"half_the_rows": capped}), flush=True)
        entry["peak_vs_plan"] = {"default_budget": free, "half_the_rows": capped}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS),
                        choices=sorted({*PRESETS, *CURVE_PRESETS}))  # fmt: skip
    parser.add_argument("--rows", type=int, default=8, help="samples per prompt / rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kit-dir", type=Path, default=None)
    parser.add_argument("--parts", nargs="+", default=["memory", "speed"],
                        choices=["memory", "speed", "server", "curve", "kv"])  # fmt: skip
    parser.add_argument("--curve-max", nargs="+", default=[], metavar="PRESET=N",
                        help="the most samples per prompt a preset's cost curve runs "
                        "(e.g. qwen3-4b=32: 128 takes ~1 h on 2 cores)")  # fmt: skip
    parser.add_argument("--speed-rows", nargs="+", type=int, default=[8, 32],
                        help="row counts decoded beside batch 1 (speed part)")  # fmt: skip
    args = parser.parse_args()
    curve_max = {k: int(v) for k, _, v in (item.partition("=") for item in args.curve_max)}
    result = bench_shapes(tuple(args.presets), QUANTS, args.rows, args.repeats, args.kit_dir,
                          parts=tuple(args.parts), speed_rows=tuple(args.speed_rows),
                          curve_max=curve_max)  # fmt: skip
    print(json.dumps(result, indent=2))
    # the parts not run this time stay as they were measured
    path = RESULTS / "shapes.json"
    previous = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    for preset in args.presets:
        result[preset] = {**previous.get(preset, {}), **result[preset]}
    print(write_result("shapes", result, merge=True))
    curves = {name: result[name]["cost_curve"] for name in CURVE_PRESETS
              if "cost_curve" in result.get(name, {})}  # fmt: skip
    if "curve" in args.parts and curves:
        print(plot_curve(curves, FIGURE))


if __name__ == "__main__":
    main()
