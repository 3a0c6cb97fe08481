"""The llama.cpp runtime against llama.cpp itself, llama-server and HF, in one run.

The real SmolLM2-135M-Instruct (the kit; its Q4_1 GGUF for llama.cpp), 2 threads:

1. batch-1 greedy decoding (seed 000's 400-token prompt, 64 new tokens, EOS ignored):
   muestra's llama.cpp runtime (batch-invariant and free batching), llama.cpp's own
   loop (`llama_decode` one token a call, its greedy sampler: what its `simple` example
   does, through llama-cpp-python), `llama-batched-bench -npl 1` (C++, no sampling), HF
   `generate` and muestra's torch runtime (fp32). Decoding alone: (64-token run −
   1-token run) / 63.
2. 32 samples of that prompt at T 0.7 (64 tokens each, EOS ignored, as the bench does):
   muestra's llama.cpp runtime against `llama-batched-bench -npl 32 -pps` (the prompt
   prefilled once and shared; it samples nothing).
3. seed 000's answer workload: the English Character spec without reasoning, 2 prompts
   × 32 samples at T 1 under the schema, stored: muestra's llama.cpp runtime with
   `field_probs` on, and muestra's remote backend against `llama-server` (same GGUF,
   `-np 32`, json_schema); samples/s and the male share each gives.
4. `field_probs` overhead: workload 3 locally with and without it.

`llama-batched-bench` and `llama-server` are built (once, cached under muestra's cache
folder) from the llama.cpp source vendored in the installed llama-cpp-python's sdist, so
both sides run the same llama.cpp. Every llama.cpp run here has the AMX/repacked weight
layouts off (`-nr`): AMX crashes in this build on this CPU.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import seed_000_messages
from benchmarks.peers import build_peers

THREADS = 2
NEW_TOKENS = 64
SAMPLES = 32


def batched_bench(binary: Path, gguf: Path, prompt: int, npl: int, flash: str) -> float:
    """`llama-batched-bench`'s generation rate (S_TG, tokens/s) for `npl` sequences, flash
    attention `flash` (on: llama.cpp's default on CPU; off: faster here)."""
    command = [
        str(binary), "-m", str(gguf), "-c", str(prompt + npl * (NEW_TOKENS + 8) + 64),
        "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(NEW_TOKENS),
        "-npl", str(npl), "-t", str(THREADS), "-nr", "-fa", flash, "--output-format", "jsonl",
    ] + (["-pps", "-kvu"] if npl > 1 else [])  # fmt: skip
    # -kvu: one KV cache for all sequences (otherwise each gets n_ctx / npl cells), as
    # muestra's runtime has
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    match = re.search(r'"speed_tg":\s*([0-9.]+)', out)
    assert match, out[-2000:]
    return float(match.group(1))


def own_loop_rate(gguf: Path, prompt: list[int], repeats: int) -> float:
    """llama.cpp's own greedy loop's decoding rate (tokens/s, prefill excluded)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_llamacpp import own_greedy

    def run(n: int) -> float:
        started = time.perf_counter()
        own_greedy(str(gguf), prompt, n)
        return time.perf_counter() - started

    one = statistics.median(run(1) for _ in range(repeats))
    full = statistics.median(run(NEW_TOKENS) for _ in range(repeats))
    return (NEW_TOKENS - 1) / (full - one)


def engine_rates(loaded: Any, prompt: list[int], repeats: int) -> dict[str, float]:
    """muestra's batch-1 greedy decoding rate and 32-sample rate on one runtime."""
    from muestra.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine.from_loaded(loaded, max_batch=64)

    def greedy(n: int) -> float:
        request = GenerationRequest(
            prompt, params=SamplingParams(temperature=0), max_new_tokens=n, ignore_eos=True
        )
        started = time.perf_counter()
        engine.generate([request])
        return time.perf_counter() - started

    def samples(n: int) -> float:
        request = GenerationRequest(
            prompt, n=SAMPLES, params=SamplingParams(temperature=0.7), seed=1,
            max_new_tokens=n, ignore_eos=True,
        )  # fmt: skip
        started = time.perf_counter()
        engine.generate([request])
        return time.perf_counter() - started

    greedy(4)  # warm up
    one = statistics.median(greedy(1) for _ in range(repeats))
    full = statistics.median(greedy(NEW_TOKENS) for _ in range(repeats))
    first = statistics.median(samples(1) for _ in range(repeats))
    many = statistics.median(samples(NEW_TOKENS) for _ in range(repeats))
    return {
        "batch1_decode_tok_s": (NEW_TOKENS - 1) / (full - one),
        "batch1_with_prefill_tok_s": NEW_TOKENS / full,
        "samples32_decode_tok_s": SAMPLES * (NEW_TOKENS - 1) / (many - first),
        "samples32_with_prefill_tok_s": SAMPLES * NEW_TOKENS / many,
    }


def hf_rate(loaded: Any, prompt: list[int], repeats: int) -> float:
    import torch

    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=2,
            )  # fmt: skip
        return time.perf_counter() - started

    run(2)
    one = statistics.median(run(1) for _ in range(repeats))
    full = statistics.median(run(NEW_TOKENS) for _ in range(repeats))
    return (NEW_TOKENS - 1) / (full - one)


def character_spec(
    folder: Path, model: dict[str, Any], field_probs: bool, samples: int = SAMPLES
) -> Path:
    """The English Character spec without reasoning: 2 prompts × `samples` at T 1."""
    import tomllib

    from muestra.experiments.toml_text import dump_toml

    source = Path(__file__).resolve().parents[1] / "src" / "muestra" / "data"
    data = tomllib.loads((source / "characters.toml").read_text("utf-8"))
    data.pop("think")
    data["samples"] = samples
    data["model"] = model
    data["answer"] = {"temperature": 1.0, "max_tokens": 80, "field_probs": field_probs,
                      "schema": str(source / "character.schema.json")}  # fmt: skip
    path = folder / f"characters-{len(list(folder.glob('*.toml')))}.toml"
    path.write_text(dump_toml(data), "utf-8")
    return path


def run_spec(spec: Path, store: Path) -> tuple[float, float]:
    """(samples/s stored, male share) of one run of `spec` into a new `store`."""
    from muestra.experiments.runner import Runner
    from muestra.experiments.spec import load_spec
    from muestra.experiments.store import reading

    loaded = load_spec(spec, check_models=False)
    local = any(model.endpoint is None for model in loaded.spec.model_list)
    runner = Runner(loaded, store, batch_rows=64 if local else None)  # --batch: local only
    runner.open()
    started = time.perf_counter()
    try:
        runner.run()
    finally:
        if runner.db is not None:
            runner.db.close()
    seconds = time.perf_counter() - started
    with reading(store) as db:
        answers = [r[0] for r in db.execute("SELECT answer_json FROM samples")]
    import json

    genders = [json.loads(a)["gender"] for a in answers if a]
    return len(answers) / seconds, genders.count("male") / max(len(genders), 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_workload(
    binary: Path,
    gguf: Path,
    folder: Path,
    repeats: int,
    samples: int = SAMPLES,
    sides: tuple[str, ...] = ("server", "exact", "exact_no_field_probs", "free"),
) -> dict[str, Any]:
    """Workload 3 (2 prompts × `samples`) against llama-server (`-np samples`, flash
    attention off: its fastest here), and locally in both modes, with and without
    field_probs (`sides`: which of these run)."""
    import httpx

    port = _free_port()
    server = subprocess.Popen(
        [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np",
         str(samples), "-c", str(samples * 1024), "-t", str(THREADS), "-nr", "-fa", "off",
         "--alias", "served"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    remote = {"id": "served", "endpoint": f"http://127.0.0.1:{port}/v1",
              "concurrency": samples, "sampling_fallback": "neutral"}  # fmt: skip
    models = {
        "server": (remote, False),
        "exact": ({"id": str(gguf), "runtime": "llamacpp"}, True),
        "exact_no_field_probs": ({"id": str(gguf), "runtime": "llamacpp"}, False),
        "free": ({"id": str(gguf), "runtime": "llamacpp", "batch_invariant": False}, True),
    }
    models = {name: models[name] for name in sides}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        for r in range(repeats):
            for name, (model, field_probs) in models.items():
                spec = character_spec(folder, model, field_probs, samples)
                runs[name].append(run_spec(spec, folder / f"{name}-{r}.db"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    rate = {k: statistics.median(v[0] for v in runs[k]) for k in runs}
    result = {
        "workload": f"characters.toml without reasoning, 2 prompts x {samples} samples at T 1, "
        "schema",
        "samples_per_s": rate,
        "male_share": {k: [round(v[1], 3) for v in runs[k]] for k in runs},
    }
    if "exact" in rate and "exact_no_field_probs" in rate:
        result["field_probs_overhead"] = rate["exact_no_field_probs"] / rate["exact"] - 1
    return result


def bench_llamacpp(kit_root: Path | None, repeats: int) -> dict[str, Any]:
    from muestra.models.inspection import render_chat
    from muestra.models.kit import ensure_kit
    from muestra.models.loading import load_model

    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    preset = "smollm2-135m-instruct"
    kit = ensure_kit(preset, kit_root / preset if kit_root else None)
    (gguf,) = kit.glob("*.gguf")
    peers = build_peers()
    exact = load_model(str(kit), runtime="llamacpp", threads=THREADS)
    free = load_model(str(kit), runtime="llamacpp", threads=THREADS, batch_invariant=False)
    fp32 = load_model(str(kit), runtime="torch", dtype="float32", threads=THREADS)
    _, prompt = render_chat(exact.tokenizer, seed_000_messages())
    bench = peers["llama-batched-bench"]

    def peer(npl: int, flash: str) -> float:
        return statistics.median(
            batched_bench(bench, gguf, len(prompt), npl, flash) for _ in range(repeats)
        )

    result: dict[str, Any] = {
        "prompt_tokens": len(prompt),
        "threads": THREADS,
        "runtime": exact.provenance.runtime,
        "muestra_llamacpp_exact": engine_rates(exact, prompt, repeats),
        "muestra_llamacpp_free": engine_rates(free, prompt, repeats),
        "muestra_torch_fp32": engine_rates(fp32, prompt, repeats),
        "hf_generate_fp32_decode_tok_s": hf_rate(fp32, prompt, repeats),
        "llama_cpp_own_loop_decode_tok_s": own_loop_rate(gguf, prompt, repeats),
        "llama_batched_bench_tg_tok_s": {
            f"npl{npl}_fa_{flash}": peer(npl, flash)
            for npl in (1, SAMPLES)
            for flash in ("on", "off")
        },
    }
    with tempfile.TemporaryDirectory() as folder:
        result["seed000_answers"] = server_workload(
            peers["llama-server"], gguf, Path(folder), repeats
        )
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The side-by-side ratios the README quotes (llama.cpp's flash attention: "on" is its
    default on CPU, "off" its fastest here)."""
    peers = result["llama_batched_bench_tg_tok_s"]
    out: dict[str, float] = {}
    for mode in ("exact", "free"):
        ours = result[f"muestra_llamacpp_{mode}"]
        out[f"{mode}: batch 1 vs HF generate"] = (
            ours["batch1_decode_tok_s"] / result["hf_generate_fp32_decode_tok_s"]
        )
        out[f"{mode}: batch 1 vs llama.cpp's own loop"] = (
            ours["batch1_decode_tok_s"] / result["llama_cpp_own_loop_decode_tok_s"]
        )
        for flash in ("on", "off"):
            out[f"{mode}: batch 1 vs llama-batched-bench, fa {flash}"] = (
                ours["batch1_decode_tok_s"] / peers[f"npl1_fa_{flash}"]
            )
            out[f"{mode}: 32 samples vs llama-batched-bench -npl 32 -pps, fa {flash}"] = (
                ours["samples32_decode_tok_s"] / peers[f"npl{SAMPLES}_fa_{flash}"]
            )
    answers = result["seed000_answers"]["samples_per_s"]
    for key in ("exact", "free"):
        out[f"{key}: answers vs llama-server"] = answers[key] / answers["server"]
    return out
