"""typical_p, the setting added through the seam: the op on a hand-worked distribution,
against HF's `TypicalLogitsWarper` (torch) and llama.cpp's typical sampler (on logits
the llama.cpp runtime computed), its draws against its distribution, and the setting
reaching the engine from every surface (flags, spec, server, remote requests)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from helpers import chi_square_sf, write_spec
from muestra.engine.sampling import SamplingBatch, SamplingParams, apply_typical_p
from muestra.errors import InputError

CPU = torch.device("cpu")


def warped(params: list[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
    return SamplingBatch.build(params, logits.shape[-1], CPU).warp(logits).logits


def test_typical_keeps_the_tokens_closest_to_the_entropy_not_the_most_likely():
    """p = [.5, .3, .15, .05]: entropy H = 1.142 nats; |−log p − H| = .449, .062, .755,
    1.854, so the most typical token is the 0.3 one. Mass 0.5 keeps it and the 0.5 one
    (0.3 < 0.5, then 0.8 reaches it); mass 0.2 keeps the 0.3 token alone."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    half = apply_typical_p(logits, torch.tensor([0.5])).softmax(-1)
    assert torch.allclose(half, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    fifth = apply_typical_p(logits, torch.tensor([0.2])).softmax(-1)
    assert torch.equal(fifth, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.equal(apply_typical_p(logits, torch.tensor([1.0])), logits)  # off


@pytest.mark.parametrize("seed", range(4))
def test_the_pipeline_with_typical_p_matches_hf_warpers(seed):
    """HF generate's warpers in its order (temperature, top-k, top-p, min-p, typical-p)
    against `SamplingBatch.warp` — the whole-vocabulary path, the top-k candidates path,
    and a batch where rows with typical_p 1 (off) stay as they were."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 500, generator=g) * 3
    ids = torch.zeros(1, 1, dtype=torch.long)
    cases = [
        (SamplingParams(temperature=0.8, typical_p=0.7), [TemperatureLogitsWarper(0.8)]),
        (
            SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, typical_p=0.6),
            [TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9),
             MinPLogitsWarper(0.02)],
        ),
        (SamplingParams(temperature=1.0, top_p=0.8), [TopPLogitsWarper(0.8)]),
    ]  # fmt: skip
    ours = warped([params for params, _ in cases], logits)
    for row, (params, before) in enumerate(cases):
        hf = logits[row : row + 1].clone()
        for warper in before:
            hf = warper(ids, hf)
        if params.typical_p < 1:
            hf = TypicalLogitsWarper(params.typical_p)(ids, hf)
        assert torch.equal(torch.isinf(ours[row : row + 1]), torch.isinf(hf)), row
        assert torch.allclose(ours[row : row + 1].softmax(-1), hf.softmax(-1), atol=1e-6)


def test_draws_with_typical_p_follow_the_processed_distribution():
    params = SamplingParams(temperature=1.0, typical_p=0.6)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    batch = SamplingBatch.build([params], 8, CPU)
    expected = batch.warp(logits).logits.softmax(-1)[0]
    assert 1 < int((expected > 0).sum()) < 8  # the filter keeps some, not all
    generator = torch.Generator().manual_seed(7)
    draws, counts = 20000, torch.zeros(8)
    for _ in range(draws):
        counts[int(batch.choose(batch.warp(logits), [generator]))] += 1
    assert counts[expected == 0].sum() == 0, "a removed token was drawn"
    kept = expected > 0
    observed, wanted = counts[kept], expected[kept] * draws
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    assert chi_square_sf(statistic, int(kept.sum()) - 1) > 1e-3


def test_typical_p_out_of_its_bound_is_refused_by_name():
    for bad in (0.0, 1.5):
        with pytest.raises(InputError, match="typical_p"):
            SamplingParams(typical_p=bad)


# ---- llama.cpp's typical sampler, on the llama.cpp runtime's logits ----------------------


def llama_typical_kept(logits: torch.Tensor, p: float) -> set[int]:
    """The token ids llama.cpp's `llama_sampler_init_typical(p, 1)` keeps of `logits`."""
    import ctypes

    import llama_cpp as lc

    values = logits.tolist()
    data = (lc.llama_token_data * len(values))(
        *[lc.llama_token_data(i, v, 0.0) for i, v in enumerate(values)]
    )
    candidates = lc.llama_token_data_array(data, len(values), -1, False)
    sampler = lc.llama_sampler_init_typical(p, 1)
    try:
        lc.llama_sampler_apply(sampler, ctypes.byref(candidates))
    finally:
        lc.llama_sampler_free(sampler)
    return {int(candidates.data[i].id) for i in range(candidates.size)}


def near_the_boundary(logits: torch.Tensor, p: float, token: int, within: float) -> bool:
    """Whether `token` is where the typical set's running probability crosses `p`, to
    `within`: computed exactly (float64), the sum before it is below p and the sum with
    it is not, or one of them lies within `within` of p."""
    log_probs = logits.double().log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum()
    order = (-log_probs - entropy).abs().argsort()
    cumulative = probs[order].cumsum(0)
    at = int((order == token).nonzero())
    before, after = float(cumulative[at] - probs[token]), float(cumulative[at])
    crosses = before < p <= after
    return crosses or abs(before - p) < within or abs(after - p) < within


@pytest.mark.slow
def test_typical_p_keeps_what_llama_cpps_typical_sampler_keeps(smol_kit):
    """On the real SmolLM2 GGUF's logits as the llama.cpp runtime computes them, after
    several prompts: the tokens `apply_typical_p` keeps are those llama.cpp's own typical
    sampler keeps, but for the one token where the running probability crosses p when
    llama.cpp's float32 softmax (its normaliser summed over the 49,152-token vocabulary in
    float32) puts that crossing on the other side of p than the exact sum does."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp runtime needs llama-cpp-python")
    from muestra.models.inspection import render_chat
    from muestra.models.loading import load_model

    cpp = load_model(str(smol_kit), runtime="llamacpp", threads=1)
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Hola"]
    same = 0
    for text in prompts:
        ids = render_chat(cpp.tokenizer, [{"role": "user", "content": text}])[1]
        sequences, fed = cpp.runtime.prefill([ids], 4)
        sequences.close()
        logits = fed.last[0].float()
        for p in (0.2, 0.5, 0.9, 0.95):
            ours = apply_typical_p(logits.unsqueeze(0), torch.tensor([p]))[0]
            kept = set(torch.isfinite(ours).nonzero().flatten().tolist())
            differ = kept ^ llama_typical_kept(logits, p)
            assert len(differ) <= 1, (text, p, differ)
            assert all(near_the_boundary(logits, p, t, 1e-4) for t in differ), (text, p)
            same += not differ
    # of 12: where they differ, llama.cpp's float32 running sum crossed p one token early
    # (7e-5 to 1.2e-4 above the exact sum on an AMD EPYC: 9 of 12 the same there; 10 or
    # more on a Sapphire Rapids)
    assert same >= 6


# ---- the setting on every surface ---------------------------------------------------------


def test_generate_applies_typical_p_as_the_engine_does(cli, tiny_kit):
    from muestra.answers.generation import TextGenerator
    from muestra.models.loading import load_model

    args = ["generate", str(tiny_kit), "--prompt", "Hola", "--n", "3", "--seed", "5"]
    args += ["--max-new-tokens", "6", "--dtype", "float32"]
    result = cli(*args, "--typical-p", "0.3")
    assert result.code == 0, result.stderr
    generator = TextGenerator(load_model(str(tiny_kit), dtype="float32"))
    ids = generator.encode_messages([{"role": "user", "content": "Hola"}], None)
    requests = generator.requests(
        [ids], n=3, params=SamplingParams(typical_p=0.3), max_new_tokens=6, seed=5
    )
    expected = [s.token_ids for s in generator.generate(requests)]
    assert [line["token_ids"] for line in result.json_lines()] == expected
    refused = cli(*args[:4], "--think-budget", "2", "--think-typical-p", "0")
    assert refused.code == 2 and "--think-typical-p=0.0 is invalid" in refused.stderr


def test_a_spec_carries_typical_p_into_both_phases(tmp_path, tiny_kit):
    from muestra.answers.decoding import phases_from
    from muestra.experiments.spec import load_spec
    from muestra.models.loading import load_model
    from muestra.settings import PhaseSettings

    path = write_spec(
        tmp_path,
        "t",
        f'[model]\nid = "{tiny_kit}"',
        "[think]\nbudget = 4\ntypical_p = 0.4\n[answer]\ntemperature = 1.0\ntypical_p = 0.7",
    )
    condition = load_spec(path).conditions[0]
    phases = phases_from(
        PhaseSettings(condition.think, condition.answer), load_model(str(tiny_kit))
    )
    assert phases.think is not None and phases.think.params.typical_p == 0.4
    assert phases.think.params.temperature == 0.6  # the rest from the kit's generation config
    assert phases.answer.params.typical_p == 0.7 and phases.answer.params.temperature == 1.0


def test_the_server_takes_typical_p_in_a_request_and_in_the_answer_phase(tiny_kit):
    from muestra.models.loading import load_model
    from muestra.server.protocol import ChatRequest, CompletionRequest, MuestraOptions
    from muestra.server.service import ServedModel

    served = ServedModel(load_model(str(tiny_kit), dtype="float32"), "t")
    try:
        body = CompletionRequest(model="t", prompt="Hola", typical_p=0.5)
        assert served.params(body).typical_p == 0.5
        unset = served.params(CompletionRequest(model="t", prompt="Hola"))
        assert unset.typical_p == 1.0  # the kit's generation config sets none: off
        options = MuestraOptions.model_validate({"answer": {"typical_p": 0.8}})
        chat = ChatRequest(model="t", messages=[{"role": "user", "content": "x"}], muestra=options)
        phases, _ = served.chat_phases(chat, options, served.params(chat), served.tags, 3)
        assert phases.answer.params.typical_p == 0.8
    finally:
        served.close()


def test_a_remote_run_sends_typical_p_and_records_where_it_came_from(tmp_path):
    from muestra.experiments.remote import request_body
    from muestra.experiments.sampling import resolve_think
    from muestra.experiments.spec import load_spec

    folder = tmp_path / "modelo"
    folder.mkdir()
    config = {"do_sample": True, "temperature": 0.6, "typical_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps(config))
    path = write_spec(
        tmp_path,
        "r",
        f'[model]\nid = "m"\nendpoint = "http://a.test/v1"\ngeneration_config = "{folder}"',
        '[think]\nbudget = 4\nmode = "tags"\n[answer]\ntypical_p = 0.5',
    )
    spec = load_spec(path)
    think = resolve_think(spec, spec.spec.model)["default"]
    assert (think.typical_p.value, think.typical_p.source) == (0.9, "generation_config")
    body = request_body(spec, spec.spec.model, spec.conditions[0], spec.spec.prompt.items[0],
                        7, think)  # fmt: skip
    assert body["typical_p"] == 0.9 and body["muestra"]["answer"]["typical_p"] == 0.5
    assert math.isclose(body["temperature"], 0.6)


def test_an_endpoint_without_a_generation_config_sends_typical_p_off_without_an_opt_in(tmp_path):
    """A spec that sets the four filters every server defaults differently still runs on an
    endpoint with no generation config on this machine: typical_p, off on every server, is
    sent off (recorded as "neutral") instead of asking for sampling_fallback."""
    from muestra.experiments.sampling import resolve_think
    from muestra.experiments.spec import load_spec

    path = write_spec(
        tmp_path,
        "r",
        '[model]\nid = "m"\nendpoint = "http://a.test/v1"',
        '[think]\nmode = "tags"\ntemperature = 0.7\ntop_p = 0.9\ntop_k = 20\nmin_p = 0.0',
    )
    spec = load_spec(path)
    think = resolve_think(spec, spec.spec.model)["default"]
    assert (think.typical_p.value, think.typical_p.source) == (1.0, "neutral")
    assert think.request_fields()["typical_p"] == 1.0 and think.top_k.source == "spec"
