"""Decoding-strategy benchmarks on the real model (SmolLM2-135M-Instruct, fp32).

Beam search: 4 chat prompts of different lengths in one batch, 4 beams, up to 48 new
tokens, length penalty 1, early_stopping False: muestra's `beam_search` vs HF
`generate(num_beams=4, do_sample=False)` on the same left-padded batch. Both must return
the same hypotheses (checked), so the ratio compares equal work.

DoLa: HF v5 has no DoLa of its own (it moved to Hub code), so its cost is measured
against plain greedy decoding of the same prompt and length, at 1 and 8 rows.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import median_time
from muestra.engine import Engine, GenerationRequest, SamplingParams
from muestra.engine.beam import BeamParams, beam_search
from muestra.models.inspection import render_chat
from muestra.models.loading import LoadedModel

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about a dragon who lives in a castle by the sea.",
    "Explain in a few words why the sky is blue.",
]
BEAMS = BeamParams(num_beams=4, length_penalty=1.0, early_stopping=False)
NEW_TOKENS = 48


def bench_beam(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    prompts = [
        render_chat(loaded.tokenizer, [{"role": "user", "content": q}])[1] for q in QUESTIONS
    ]
    engine = Engine.from_loaded(loaded)
    requests = [GenerationRequest(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 1)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def ours() -> list[list[int]]:
        return [h[0].token_ids for h in beam_search(engine, requests, BEAMS)]

    def hf() -> list[list[int]]:
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=BEAMS.num_beams,
                length_penalty=BEAMS.length_penalty,
                early_stopping=BEAMS.early_stopping,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=sorted(engine.eos_token_ids),
                pad_token_id=1,
                top_k=None,
                top_p=None,
                temperature=None,
            )
        return [row[width:].tolist() for row in out]

    mine, theirs = ours(), hf()
    same = all(t[: len(m)] == m for m, t in zip(mine, theirs, strict=True))
    ours_s, ours_runs = median_time(ours, repeats)
    hf_s, hf_runs = median_time(hf, repeats)
    return {
        "workload": f"{len(prompts)} chat prompts × {BEAMS.num_beams} beams, ≤{NEW_TOKENS} "
        "new tokens, fp32",
        "same_hypotheses_as_hf": same,
        "generated_tokens_best": [len(m) for m in mine],
        "engine_s": ours_s,
        "hf_generate_s": hf_s,
        "speedup_vs_hf": hf_s / ours_s,
        "engine_runs_s": ours_runs,
        "hf_runs_s": hf_runs,
    }


def bench_dola(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    """DoLa's cost per token against plain greedy decoding, same prompt and length (EOS
    ignored): batch 1 and 8 rows, for "low" and "high" candidate layers."""
    engine = Engine.from_loaded(loaded)
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": QUESTIONS[2]}])[1]
    result: dict[str, Any] = {"new_tokens": NEW_TOKENS}
    for rows in (1, 8):

        def run(dola: str | None, rows: int = rows) -> None:
            params = SamplingParams(temperature=0, dola_layers=dola)
            request = GenerationRequest(
                prompt, n=rows, params=params, max_new_tokens=NEW_TOKENS, ignore_eos=True
            )
            engine.generate([request])

        plain_s, _ = median_time(lambda: run(None), repeats)
        entry: dict[str, Any] = {"plain_s": plain_s}
        for dola in ("low", "high"):
            seconds, _ = median_time(lambda dola=dola: run(dola), repeats)
            layers = engine.dola_layers(SamplingParams(dola_layers=dola))
            entry[dola] = {"s": seconds, "layers": list(layers or ()), "cost": seconds / plain_s}
        result[f"rows_{rows}"] = entry
    return result


COPY_TEXT = (
    "Repeat this text exactly, word for word:\n\nThe quick brown fox jumps over the lazy dog. "
    "Muestra samples language models many times under exact control and measures what comes "
    "out, so that a researcher can tell whether a model's preference is real or noise."
)


def bench_lookup(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    """Prompt lookup (10 draft tokens, n-grams ≤ 2) vs plain greedy, batch 1, 64 tokens at
    most: a prompt the answer copies, and one with nothing to copy."""
    from muestra.engine.lookup import lookup_greedy

    engine = Engine.from_loaded(loaded)
    result: dict[str, Any] = {}
    for name, question in (("copy", COPY_TEXT), ("no_copy", QUESTIONS[2])):
        prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": question}])[1]
        request = GenerationRequest(prompt, params=SamplingParams(temperature=0), max_new_tokens=64)
        plain_ids = engine.generate([request])[0][0].token_ids
        found = lookup_greedy(engine, request)
        plain_s, _ = median_time(lambda request=request: engine.generate([request]), repeats)
        lookup_s, _ = median_time(lambda request=request: lookup_greedy(engine, request), repeats)
        result[name] = {
            "same_tokens_as_greedy": found.token_ids == plain_ids,
            "tokens": len(found.token_ids),
            "forwards": found.forwards + 1,
            "acceptance_rate": found.acceptance_rate,
            "plain_s": plain_s,
            "lookup_s": lookup_s,
            "speedup": plain_s / lookup_s,
        }
    result["copy_batch_4"] = _lookup_batch(loaded, engine, repeats)
    return result


def _lookup_batch(loaded: LoadedModel, engine: Engine, repeats: int) -> dict[str, Any]:
    """Four copy prompts (different texts) as one ragged prompt-lookup batch, against
    the batched engine decoding the same four greedily."""
    from muestra.engine.lookup import lookup_decode

    texts = [
        COPY_TEXT,
        COPY_TEXT.replace("quick brown fox", "slow grey cat"),
        "Repeat this text exactly, word for word:\n\nEvery sample is reproducible from its "
        "seed and its configuration, and every stored answer validates against its schema.",
        "Repeat this text exactly, word for word:\n\nThe same specification samples the same "
        "distribution on every backend, because every sampling setting is resolved.",
    ]
    greedy = SamplingParams(temperature=0)
    requests = [
        GenerationRequest(
            render_chat(loaded.tokenizer, [{"role": "user", "content": t}])[1],
            params=greedy,
            max_new_tokens=64,
        )
        for t in texts
    ]
    plain = [row[0].token_ids for row in engine.generate(requests)]
    found = [row[0] for row in lookup_decode(engine, requests)]
    plain_s, _ = median_time(lambda: engine.generate(requests), repeats)
    lookup_s, _ = median_time(lambda: lookup_decode(engine, requests), repeats)
    drafted = sum(f.drafted for f in found)
    return {
        "same_tokens_as_greedy": [f.token_ids for f in found] == plain,
        "tokens": sum(len(f.token_ids) for f in found),
        "forwards": max(f.forwards for f in found) + 1,
        "acceptance_rate": sum(f.accepted for f in found) / drafted if drafted else 0.0,
        "plain_s": plain_s,
        "lookup_s": lookup_s,
        "speedup": plain_s / lookup_s,
    }


def bench_speculative(loaded: LoadedModel, repeats: int) -> dict[str, Any]:
    """Greedy speculative decoding with the model's own first 24 of 30 layers as the draft
    (no smaller sibling of SmolLM2-135M exists offline), 4 draft tokens, 48 tokens, batch 1,
    against plain greedy decoding."""
    from muestra.engine.speculative import layer_draft, speculative_generate

    engine = Engine.from_loaded(loaded)
    draft = layer_draft(loaded.model, 24)
    prompt = render_chat(loaded.tokenizer, [{"role": "user", "content": QUESTIONS[2]}])[1]
    request = GenerationRequest(prompt, params=SamplingParams(temperature=0), max_new_tokens=48)
    plain_ids = engine.generate([request])[0][0].token_ids
    found = speculative_generate(engine, draft, request, 4)
    plain_s, _ = median_time(lambda: engine.generate([request]), repeats)
    spec_s, _ = median_time(lambda: speculative_generate(engine, draft, request, 4), repeats)
    return {
        "draft": "first 24 of 30 layers + norm + head (shared weights)",
        "same_tokens_as_greedy": found.token_ids == plain_ids,
        "tokens": len(found.token_ids),
        "rounds": found.rounds,
        "acceptance_rate": found.acceptance_rate,
        "plain_s": plain_s,
        "speculative_s": spec_s,
        "speedup": plain_s / spec_s,
    }
