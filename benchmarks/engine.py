"""Engine benchmarks (issue 2/6), on the kit's `qwen3-0.6b` in bf16.

1. 16 different prompts × 64 tokens → 32 new tokens, sampling: engine vs HF `generate`.
2. Seed 000's prompt × 32 samples × 64 new tokens: engine (shared prefill) vs HF
   `generate(num_return_sequences=32)` vs a faithful re-implementation of seed 000's
   loop (batch 1, one sample after another, softmax(logits / T) + multinomial per token).
   The seed loop is strictly sequential, so it runs `seed_loop_samples` samples and its
   time is scaled to 32 (reported as such).
3. Batch-1 decode step time vs the memory-bandwidth floor: weight bytes ÷ copy bandwidth
   measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks.common import median_time, seed_000_messages
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.models.inspection import render_chat
from muestra.models.loading import LoadedModel

QWEN_SAMPLING = SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
HF_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def _prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    text = (
        "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que "
        "vivía un hidalgo de los de lanza en astillero, adarga antigua, rocín flaco y galgo "
        "corredor. Una olla de algo más vaca que carnero, salpicón las más noches, duelos y "
        "quebrantos los sábados, lentejas los viernes, algún palomino de añadidura los domingos, "
        "consumían las tres partes de su hacienda. "
    ) * 8
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i * 7 : i * 7 + length] for i in range(count)]


def _hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> None:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=151643,
        **kwargs,
    )


def bench_batch(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    engine = Engine.from_loaded(loaded)
    prompts = _prompts(loaded.tokenizer, 16, 64)
    requests = [
        GenerationRequest(
            p, params=QWEN_SAMPLING, max_new_tokens=32, seed=1, prompt_index=i, ignore_eos=True
        )
        for i, p in enumerate(prompts)
    ]
    ours, ours_runs = median_time(lambda: engine.generate(requests), repeats)
    hf, hf_runs = median_time(
        lambda: _hf_generate(loaded.model, prompts, 32, **HF_SAMPLING), repeats
    )
    return {
        "workload": "16 prompts x 64 tokens -> 32 new tokens, T=0.6 top-k 20 top-p 0.95",
        "engine_s": ours,
        "hf_generate_s": hf,
        "speedup_vs_hf": hf / ours,
        "engine_tok_s": 16 * 32 / ours,
        "hf_tok_s": 16 * 32 / hf,
        "runs": {"engine": ours_runs, "hf": hf_runs},
    }


@torch.inference_mode()
def seed_000_loop(model: Any, prompt: list[int], new_tokens: int, temperature: float) -> list[int]:
    """Seed 000's reasoning loop: batch 1, KV cache, softmax(logits / T), multinomial."""
    past = None
    step_input = torch.tensor([prompt])
    out_ids = []
    for _ in range(new_tokens):
        out = model(input_ids=step_input, cache=past, use_cache=True)
        past = out.cache
        probs = torch.softmax(out.logits[0, -1, :] / temperature, dim=-1)
        token = torch.multinomial(probs, num_samples=1)
        out_ids.append(token.item())
        step_input = token.view(1, 1)
    return out_ids


def bench_seed_000(loaded: LoadedModel, repeats: int, seed_loop_samples: int) -> dict[str, Any]:
    engine = Engine.from_loaded(loaded)
    _, prompt = render_chat(loaded.tokenizer, seed_000_messages())
    request = GenerationRequest(
        prompt, n=32, params=QWEN_SAMPLING, max_new_tokens=64, seed=1, ignore_eos=True
    )
    ours, ours_runs = median_time(lambda: engine.generate([request]), repeats)
    hf, hf_runs = median_time(
        lambda: _hf_generate(loaded.model, [prompt], 64, num_return_sequences=32, **HF_SAMPLING),
        repeats,
    )

    def loop() -> None:
        for _ in range(seed_loop_samples):
            seed_000_loop(loaded.model, prompt, 64, temperature=0.6)

    loop_time, loop_runs = median_time(loop, max(1, repeats // 2), warmup=0)
    loop_32 = loop_time * 32 / seed_loop_samples
    return {
        "workload": f"seed 000 prompt ({len(prompt)} tokens) x 32 samples x 64 new tokens",
        "engine_s": ours,
        "hf_generate_s": hf,
        "seed_loop_s_scaled_to_32": loop_32,
        "seed_loop_samples_timed": seed_loop_samples,
        "speedup_vs_hf": hf / ours,
        "speedup_vs_seed_loop": loop_32 / ours,
        "runs": {"engine": ours_runs, "hf": hf_runs, "seed_loop": loop_runs},
    }


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (read + write counted)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def bench_decode_floor(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    engine = Engine.from_loaded(loaded)
    prompt = _prompts(loaded.tokenizer, 1, 16)[0]
    tokens = 64
    step_times = []
    for _ in range(repeats):
        stamps = []
        request = GenerationRequest(
            prompt, params=SamplingParams(temperature=0), max_new_tokens=tokens, ignore_eos=True
        )
        for _event in engine.stream([request]):
            stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        step_times.append(statistics.median(gaps))
    step = statistics.median(step_times)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = copy_bandwidth()
    floor = weight_bytes / bandwidth
    return {
        "workload": "batch 1 greedy decode step (median over 64 steps)",
        "step_s": step,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_s": bandwidth,
        "floor_s": floor,
        "ratio_to_floor": step / floor,
        "tok_s": 1 / step,
    }
