"""Where a decode step's time goes on the real model (issue #17's "profile first").

`make bench BENCH_ARGS="--only step_profile"`: on SmolLM2-135M-Instruct (fp32, the kit's
folder), with an 87-token chat prompt:

- the engine's decode step at batch 1 (greedy) and batch 32 (T 0.7), wall time per step
  (33 steps minus 1, so the prefill cancels);
- the torch profiler's split of 16 decode steps into matrix products (`aten::mm`),
  attention (`aten::_scaled_dot_product_*`) and everything else (self CPU time);
- the fp32 weight bytes a step reads and the floor they give at the machine's measured
  copy bandwidth;
- HF's forward on a `StaticCache` at batch 1, eager and through `torch.compile`
  (inductor), same run: the compile time and the step it reaches — how much of the
  step is Python/eager overhead that compilation can remove.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

PRESET = "smollm2-135m-instruct"
PROMPT = "Describe a fantasy character in detail. " * 8


def _prompt(loaded: Any) -> list[int]:
    return loaded_text(loaded).encode_messages([{"role": "user", "content": PROMPT}], None)


def loaded_text(loaded: Any) -> Any:
    from muestra.answers.generation import TextGenerator

    return TextGenerator(loaded)


def _step_ms(engine: Any, prompt: list[int], n: int, temperature: float) -> float:
    from muestra.engine import GenerationRequest, SamplingParams

    def run(tokens: int) -> float:
        request = GenerationRequest(
            list(prompt),
            n=n,
            params=SamplingParams(temperature=temperature),
            max_new_tokens=tokens,
            seed=1,
            ignore_eos=True,
        )
        started = time.perf_counter()
        engine.generate([request])
        return time.perf_counter() - started

    run(4)  # warm-up
    return (run(33) - run(1)) / 32 * 1000


def _split(engine: Any, prompt: list[int], n: int, temperature: float) -> dict[str, float]:
    """Share of self CPU time of 16 decode steps: mm, attention, the rest."""
    from torch.profiler import ProfilerActivity, profile

    from muestra.engine import GenerationRequest, SamplingParams
    from muestra.engine.engine import NoHook

    request = GenerationRequest(
        list(prompt),
        n=n,
        params=SamplingParams(temperature=temperature),
        max_new_tokens=17,
        seed=1,
        ignore_eos=True,
    )
    batch = engine.start_batch(engine.rows_for(0, request))  # prefill outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(16):
            batch.step(NoHook())
            batch.forward()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    mm = sum(
        e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")
    )
    attention = sum(
        e.self_cpu_time_total
        for e in prof.key_averages()
        if e.key.startswith("aten::_scaled_dot_product")
    )
    return {
        "matmul_share": mm / total,
        "attention_share": attention / total,
        "other_share": (total - mm - attention) / total,
    }


def _hf_static(model: Any, prompt: list[int], forward: Any, steps: int) -> list[float]:
    from transformers import StaticCache

    ids = torch.tensor([prompt])
    cache = StaticCache(config=model.config, max_cache_len=len(prompt) + steps + 8)
    times = []
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(len(prompt)),
        )
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            position = torch.tensor([len(prompt) + i])
            started = time.perf_counter()
            out = forward(
                input_ids=token,
                past_key_values=cache,
                use_cache=True,
                cache_position=position,
                position_ids=position.unsqueeze(0),
            )
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - started)
    return times


def _median_ms(times: list[float]) -> float:
    return sorted(times)[len(times) // 2] * 1000


def bench_step_profile(kit_root: Path | None) -> dict[str, Any]:
    from benchmarks.engine import copy_bandwidth
    from muestra.engine import Engine
    from muestra.models.kit import ensure_kit
    from muestra.models.loading import load_model

    kit = ensure_kit(PRESET, kit_root / PRESET if kit_root else None)
    loaded = load_model(str(kit), dtype="float32", device="cpu")
    engine = Engine.from_loaded(loaded)
    prompt = _prompt(loaded)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = copy_bandwidth()
    result: dict[str, Any] = {
        "prompt_tokens": len(prompt),
        "weight_bytes": weights,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "floor_ms": weights / bandwidth * 1000,
        "threads": torch.get_num_threads(),
    }
    for n, temperature in ((1, 0.0), (32, 0.7)):
        result[f"batch{n}"] = {
            "step_ms": _step_ms(engine, prompt, n, temperature),
            **_split(engine, prompt, n, temperature),
        }
    model = loaded.model
    eager = _hf_static(model, prompt, model.forward, 32)
    started = time.perf_counter()
    compiled = torch.compile(model.forward, dynamic=False)
    _hf_static(model, prompt, compiled, 3)
    compile_s = time.perf_counter() - started
    steady = _hf_static(model, prompt, compiled, 32)
    result["hf_static"] = {
        "eager_step_ms": _median_ms(eager),
        "compiled_step_ms": _median_ms(steady),
        "compile_s": compile_s,
        "compiled_vs_eager": _median_ms(eager) / _median_ms(steady),
        "compiled_vs_muestra_batch1": result["batch1"]["step_ms"] / _median_ms(steady),
    }
    return result
