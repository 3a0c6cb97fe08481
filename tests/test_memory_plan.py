"""Memory planned before it is spent: KV bytes per token from real shapes, the budget,
the refusal before a model loads, rows capped at what fits, the plan stored with the run."""

from __future__ import annotations

import contextlib
import gc
import json
import re
import sqlite3
import weakref
from contextlib import closing
from pathlib import Path

import pytest

import helpers
from muestra.errors import InputError, MemoryBudgetError
from muestra.experiments import planning
from muestra.experiments.planning import RUN_RESERVE, Budget, parse_memory, plan_memory
from muestra.experiments.spec import load_spec
from muestra.models.gguf_header import read_gguf_header
from muestra.models.loading import check_model
from muestra.models.memory import (
    LlamaBuffers,
    ModelMemory,
    kv_bytes_per_token_from_config,
    kv_bytes_per_token_from_gguf,
    model_memory,
)

# the published config.json of Qwen/Qwen3-4B and Qwen/Qwen3-1.7B (the keys that size them)
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 2560, "head_dim": 128,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 36,
            "torch_dtype": "bfloat16"}  # fmt: skip
QWEN3_1_7B = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 2048, "head_dim": 128,
              "num_attention_heads": 16, "num_key_value_heads": 8, "num_hidden_layers": 28,
              "torch_dtype": "bfloat16"}  # fmt: skip


def test_kv_bytes_per_token_of_published_qwen3_shapes():
    assert kv_bytes_per_token_from_config(QWEN3_4B, "float16") == 147_456  # 144 KiB
    assert kv_bytes_per_token_from_config(QWEN3_4B, "bfloat16") == 147_456
    assert kv_bytes_per_token_from_config(QWEN3_4B, "float32") == 2 * 147_456
    assert kv_bytes_per_token_from_config(QWEN3_1_7B, "float16") == 114_688
    # the arithmetic: 50 rows of 1,500 tokens on the 4B shape ≈ 11 GB of KV cache
    assert 50 * 1_500 * 147_456 == 11_059_200_000
    # GPT-2's names, no KV heads of its own (every head keeps its keys), no head_dim
    gpt2 = {"n_layer": 12, "n_head": 12, "n_embd": 768}
    assert kv_bytes_per_token_from_config(gpt2, "float32") == 12 * 12 * 2 * 64 * 4
    # a multimodal config: the language model's own table
    assert kv_bytes_per_token_from_config({"text_config": QWEN3_1_7B}, "float16") == 114_688


@pytest.mark.parametrize("name, published", [("qwen3-4b", QWEN3_4B), ("qwen3-1.7b", QWEN3_1_7B)])
def test_the_real_shaped_kit_presets_are_the_published_configs(name, published):
    """benchmarks/shapes.py measures memory and speed on these presets: they must be the
    published shapes (random weights stand in for the trained ones)."""
    from muestra.models.kit.presets import QWEN_VOCAB, get_preset

    config = get_preset(name).config
    for key in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers"):  # fmt: skip
        assert config[key] == published[key], key
    assert config["vocab_size"] == QWEN_VOCAB and config["tie_word_embeddings"] is True
    assert kv_bytes_per_token_from_config(config, "bfloat16") == kv_bytes_per_token_from_config(
        published, "bfloat16"
    )


def test_kv_of_a_real_gguf_is_what_llama_cpp_allocates(smol_kit, capsys, monkeypatch):
    """SmolLM2-135M's GGUF: the KV bytes per token from its metadata equal the HF config
    of the same kit, and llama.cpp's own log of the cache it allocates."""
    pytest.importorskip("llama_cpp")
    from muestra.models.runtime.llamacpp_runtime import FIRST_CELLS, LlamaCppRuntime

    (gguf,) = smol_kit.glob("*.gguf")
    header = read_gguf_header(gguf)
    per_token = kv_bytes_per_token_from_gguf(header)
    config = json.loads((smol_kit / "config.json").read_text())
    assert per_token == kv_bytes_per_token_from_config(config, "float16") == 23_040
    assert kv_bytes_per_token_from_gguf(header, "q8_0") == 30 * 3 * 128 * 34 // 32
    monkeypatch.setenv("MUESTRA_LLAMA_LOG", "1")  # llama.cpp's log on stderr
    runtime = LlamaCppRuntime(gguf, threads=1)
    runtime.reserve(64)  # the first context: FIRST_CELLS cells
    log = capsys.readouterr().err
    found = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers", log)
    assert found is not None, log[-2000:]
    cells = int(found.group(2))
    assert cells == runtime.cells == FIRST_CELLS and int(found.group(3)) == 30
    assert found.group(1) == f"{per_token * cells / 2**20:.2f}"  # 90.00 MiB
    # the weights: what llama.cpp maps (llama_model_size) is what the plan counts
    memory = model_memory(check_model(str(gguf)), "llamacpp")
    assert memory.weights_bytes == runtime.weights_bytes == 96_576_768
    assert memory.kv_bytes_per_token == per_token


def test_torch_weights_and_kv_equal_what_the_loaded_model_holds(tiny_kit):
    """The tiny kit's plan numbers against the loaded model: its parameters' bytes, and the
    bytes of the KV cache a forward pass of N tokens leaves behind."""
    import torch

    from muestra.models.loading import load_model

    for dtype, element in (("auto", 4), ("bfloat16", 2)):
        memory = model_memory(check_model(str(tiny_kit)), "torch", dtype)
        loaded = load_model(str(tiny_kit), dtype=dtype, device="cpu", runtime="torch")
        assert memory.weights_bytes == loaded.runtime.weights_bytes
        tokens = 37
        with torch.inference_mode():
            out = loaded.model(torch.arange(tokens)[None], use_cache=True)
        cache = out.past_key_values
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert memory.kv_bytes_per_token * tokens == held
        config = loaded.model.config
        assert memory.kv_bytes_per_token == (
            config.num_hidden_layers * config.num_key_value_heads * 2 * config.head_dim * element
        )


@pytest.mark.parametrize(
    ("value", "size"),
    [("8GiB", 8 * 2**30), ("12GB", 12 * 10**9), ("500MiB", 500 * 2**20), ("1.5 GiB", 3 * 2**29),
     ("64kib", 64 * 1024), ("123", 123), (4_000_000_000, 4_000_000_000)],
)  # fmt: skip
def test_budget_sizes(value, size):
    assert parse_memory(value, "--max-memory") == size


@pytest.mark.parametrize("value", ["lots", "", "0", "0GB", "-1GB", "8 GiBs", "8e9", "GB", 0, -5,
                                   True, 1.5, None])  # fmt: skip
def test_bad_budgets_are_refused_by_name(value):
    with pytest.raises(InputError, match=r"^--max-memory: .*(size|zero)"):
        parse_memory(value, "--max-memory")


def test_a_llama_cpp_plan_counts_the_context_llama_cpp_makes():
    """On llama.cpp the plan counts one context: each row's cells and its drafts' room,
    the slack, whole 256-cell steps, never below the first context. Two short rows of a
    Qwen3-4B shape take the first context's 4,096 cells (576 MiB), not 2 × 500 tokens
    (144 MiB); a budget without room for it is refused naming it."""
    from muestra.experiments.planning import LlamaCache

    memory = ModelMemory(weights_bytes=2_491_323_904, kv_bytes_per_token=147_456, source="t")
    cache = LlamaCache(floor=4096, row_extra=16, slack=8, ubatch=63, outputs=256, flash=True)
    budget = Budget(16 * 2**30, "--max-memory 16GiB")
    two = plan_memory("qwen3-4b", memory, (300, 0, 200), 2, budget, held=2**30,
                      llama_cache=cache)  # fmt: skip
    assert two.rows == 2 and two.kv_cells == 4096
    assert two.peak_bytes == 2**30 + RUN_RESERVE + 2_491_323_904 + 4096 * 147_456
    assert "llama.cpp's cache 4,096 cells (576 MiB)" in two.describe()
    eight = Budget(8 * 2**30, "--max-memory 8GiB")
    many = plan_memory("qwen3-4b", memory, (300, 1_000, 200), 50, eight, held=2**30,
                       llama_cache=cache)  # fmt: skip
    room = 7 * 2**30 - RUN_RESERVE - 2_491_323_904
    cells = lambda rows: -(-(rows * 1_516 + 8) // 256) * 256  # noqa: E731
    assert many.rows == max(r for r in range(1, 51) if cells(r) * 147_456 <= room)
    assert many.kv_cells == cells(many.rows) and many.peak_bytes <= eight.bytes
    assert 1 < many.rows < 50
    assert cells(many.rows + 1) * 147_456 > room
    with pytest.raises(MemoryBudgetError) as refused:
        plan_memory("qwen3-4b", memory, (300, 0, 200), 2, Budget(3 * 2**30, "x"), 2**29,
                    llama_cache=cache)  # fmt: skip
    assert "llama.cpp's first context of 4,096 cells (576 MiB)" in str(refused.value)


# a Qwen3-4B shape's buffers: vocabulary, query heads, 3 × 9,728 + 2 × 2,560 floats a token
QWEN3_4B_BUFFERS = LlamaBuffers(vocab=151_936, heads=32, per_token=3 * 9_728 + 2 * 2_560)


def test_a_llama_cpp_plan_counts_the_buffers_beside_the_cache():
    """llama.cpp's output and compute buffers are in the plan's peak, in the rows it
    admits and in its refusal. With exact batching they do not grow with the context
    (~305 MiB on a Qwen3-4B shape); without flash attention (free batching) the attention
    scores do, and fewer rows fit the same budget."""
    from muestra.experiments.planning import LlamaCache

    memory = ModelMemory(2_491_323_904, 147_456, "t", QWEN3_4B_BUFFERS)
    exact = LlamaCache(floor=4096, row_extra=16, slack=8, ubatch=63, outputs=256, flash=True)
    free = LlamaCache(floor=4096, row_extra=16, slack=8, ubatch=512, outputs=512, flash=False)
    budget = Budget(8 * 2**30, "--max-memory 8GiB")
    tokens = (300, 1_000, 200)
    plans = {name: plan_memory("qwen3-4b", memory, tokens, 50, budget, held=2**30,
                               llama_cache=cache)  # fmt: skip
             for name, cache in (("exact", exact), ("free", free))}  # fmt: skip
    logits = 151_936 * 256 * 4
    assert plans["exact"].buffer_bytes(1) == plans["exact"].buffer_bytes(30)
    assert plans["exact"].buffer_bytes(1) == 2 * logits + 63 * (3 * 9_728 + 2 * 2_560) * 4
    assert 300 * 2**20 < plans["exact"].buffer_bytes(1) < 310 * 2**20
    scores = plans["free"].kv_cells * 512 * 33 * 4  # cells × ubatch × (heads + 1) floats
    assert plans["free"].buffer_bytes(plans["free"].rows) > scores > 2**30
    for plan in plans.values():
        rows = plan.rows
        assert plan.peak_bytes == (2**30 + RUN_RESERVE + 2_491_323_904 + plan.kv_bytes(rows)
                                   + plan.buffer_bytes(rows)) <= budget.bytes  # fmt: skip
        assert 2**30 + RUN_RESERVE + 2_491_323_904 + plan.context_bytes(rows + 1) > budget.bytes
        assert plan.as_dict()["buffer_bytes"] == plan.buffer_bytes(rows)
    assert plans["free"].rows < plans["exact"].rows < 50
    assert "and buffers 305 MiB" in plans["exact"].describe()
    with pytest.raises(MemoryBudgetError) as refused:  # fits only without the 305 MiB
        plan_memory("qwen3-4b", memory, (300, 0, 200), 2, Budget(3_800_000_000, "x"),
                    2**29, llama_cache=exact)  # fmt: skip
    assert "4,096 cells (576 MiB), and its buffers 305 MiB" in str(refused.value)
    assert plan_memory("qwen3-4b", memory, (300, 0, 200), 2, Budget(4_200_000_000, "x"),
                       2**29, llama_cache=exact).rows == 2  # fmt: skip


@pytest.mark.parametrize(("exact", "cells"), [(True, 4096), (True, 16384), (False, 4096),
                                              (False, 16384)])  # fmt: skip
def test_llama_cpp_buffers_are_counted_from_above(smol_kit, capsys, monkeypatch, exact, cells):
    """SmolLM2's GGUF in muestra's contexts (exact batching: flash attention, 63-token
    micro-batches; free: neither): llama.cpp's own log of its output and compute buffers
    is at most what the plan counts, and the compute buffer within 10 % of it."""
    pytest.importorskip("llama_cpp")
    from muestra.experiments.planning import llama_cache
    from muestra.models.runtime.llamacpp_runtime import LlamaCppRuntime

    (gguf,) = smol_kit.glob("*.gguf")
    buffers = model_memory(check_model(str(gguf)), "llamacpp").buffers
    assert buffers == LlamaBuffers(vocab=49_152, heads=9, per_token=3 * 1_536 + 2 * 576)
    shape = llama_cache(exact)
    monkeypatch.setenv("MUESTRA_LLAMA_LOG", "1")  # llama.cpp's log on stderr
    runtime = LlamaCppRuntime(gguf, threads=1, exact=exact)
    runtime._new_context(cells)
    log = capsys.readouterr().err
    mib = {name: float(re.search(rf"CPU +{name} buffer size = +([\d.]+) MiB", log).group(1))
           for name in ("output", "compute")}  # fmt: skip
    assert runtime.cells == cells
    output = buffers.output_bytes(shape.outputs) / 2**20
    compute = buffers.compute_bytes(cells, shape.ubatch, shape.outputs, shape.flash) / 2**20
    assert mib["output"] <= output
    assert mib["compute"] <= compute <= 1.1 * mib["compute"], (mib, compute)


def test_plan_arithmetic_and_the_refusal_names_the_numbers():
    memory = ModelMemory(weights_bytes=8 * 2**30, kv_bytes_per_token=147_456, source="test")
    budget = Budget(16 * 2**30, "--max-memory 16GiB")
    plan = plan_memory("qwen3-4b", memory, (300, 1_000, 200), 50, budget, held=2**30)
    assert plan.kv_bytes_per_row == 147_456 * 1_500
    assert plan.rows == (7 * 2**30 - RUN_RESERVE) // (147_456 * 1_500) == 33  # of 50 asked
    assert plan.peak_bytes == 2**30 + RUN_RESERVE + 8 * 2**30 + 33 * 147_456 * 1_500 <= budget.bytes
    assert "33 rows at once (of 50 asked)" in plan.describe()
    assert plan_memory("m", memory, (300, 1_000, 200), 8, budget, held=0).rows == 8
    with pytest.raises(MemoryBudgetError) as refused:
        plan_memory("qwen3-4b", memory, (300, 1_000, 200), 50, Budget(9 * 2**30, "x"), 2**30)
    message = str(refused.value)
    for part in ("8 GiB", "211 MiB", "300 prompt", "1,000 think", "200 answer", "9 GiB",
                 "--max-memory", "think budget", "max_tokens", "prompt"):  # fmt: skip
        assert part in message, (part, message)


def test_a_beam_searchs_beams_are_counted_together_whatever_the_batch():
    """A prompt's beams decode together (engine/beam.py), past the batch if need be: the
    plan's peak and llama.cpp's cache count them, and a budget without room for them is
    refused by name, not met mid-run."""
    memory = ModelMemory(weights_bytes=8 * 2**30, kv_bytes_per_token=147_456, source="test")
    budget = Budget(16 * 2**30, "--max-memory 16GiB")
    row = 147_456 * 1_500
    plan = plan_memory("m", memory, (300, 1_000, 200), 8, budget, 2**30, beam_rows=20)
    assert (plan.rows, plan.beam_rows, plan.rows_at_once) == (8, 20, 20)
    assert plan.peak_bytes == 2**30 + RUN_RESERVE + 8 * 2**30 + 20 * row
    assert "8 rows at once, 20 in a beam search (its beams decode together)" in plan.describe()
    assert plan.as_dict()["rows_at_once"] == 20
    narrow = plan_memory("m", memory, (300, 1_000, 200), 8, budget, 2**30, beam_rows=4)
    assert narrow.rows_at_once == 8 and "beam" not in narrow.describe()
    from muestra.experiments.planning import LlamaCache

    cache = LlamaCache(floor=4_096, row_extra=0, slack=0, ubatch=512, outputs=1, flash=True)
    on_llama = plan_memory("m", memory, (300, 1_000, 200), 2, budget, 0, cache, beam_rows=20)
    assert on_llama.kv_cells == 20 * 1_500 + (-20 * 1_500) % 256  # the beams' cells, not 2 rows'
    with pytest.raises(MemoryBudgetError) as refused:  # room for 33 rows (the test above)
        plan_memory("m", memory, (300, 1_000, 200), 8, budget, 2**30, beam_rows=50)
    message = " ".join(str(refused.value).split())
    for part in ("num_beams = 50 decodes its 50 beams together", "room for 33 rows",
                 "Lower num_beams", "--max-memory 16GiB"):  # fmt: skip
        assert part in message, (part, message)


def test_a_beam_run_holds_the_rows_its_plan_counts(cli, tiny_kit, tmp_path, monkeypatch):
    """--batch 2 with num_beams = 6: the forward passes hold the 6 beams at once, and the
    plan stored with the run says so (it counted 2 rows); each prompt's beam search runs
    once for its 6 ranks (it ran once per batch of 2)."""
    rows_seen = helpers.count_feeds(monkeypatch)
    from muestra.engine import beam

    searches: list[int] = []
    run = beam._Search.run

    def searching(self):
        searches.append(len(self.requests))
        return run(self)

    monkeypatch.setattr(beam._Search, "run", searching)
    beams = SPEC.replace("budget = 24", 'budget = 6\nstrategy = "beam"\nnum_beams = 6')
    spec = helpers.write_spec(tmp_path, "mem", "", beams.format(model=tiny_kit, run=""), samples=6)
    store = tmp_path / "beams.db"
    result = cli("run", str(spec), "--out", str(store), "--batch", "2")
    assert result.code == 0, result.stderr
    assert "2 rows at once, 6 in a beam search" in " ".join(result.stderr.split())
    with closing(sqlite3.connect(store)) as db:
        (stored,) = [json.loads(r[0]) for r in db.execute("SELECT plan_json FROM memory_plans")]
    assert max(rows_seen) == stored["rows_at_once"] == 6 and stored["rows"] == 2
    assert searches == [1, 1]  # one search per prompt gives its 6 ranks (not one per 2)
    assert stored["peak_bytes"] >= stored["held_bytes"] + 6 * stored["kv_bytes_per_row"]


def test_field_probs_copies_of_finished_rows_are_counted_on_torch():
    """On torch, field_probs copies a finished row's keys and values until it expands its
    untaken branches, and copies them again into the expansion's batch: the plan counts
    2 × min(rows, kept_rows) rows more (llama.cpp only tags cells: nothing more)."""
    from muestra.experiments.planning import LlamaCache

    memory = ModelMemory(weights_bytes=8 * 2**30, kv_bytes_per_token=147_456, source="test")
    budget = Budget(16 * 2**30, "--max-memory 16GiB")
    row = 147_456 * 1_500
    plan = plan_memory("m", memory, (300, 1_000, 200), 50, budget, 2**30, kept_rows=8)
    assert plan.rows == 17  # 17 rows + 2 × 8 copies = the 33 rows of room
    assert plan.peak_bytes == 2**30 + RUN_RESERVE + 8 * 2**30 + (17 + 16) * row
    shown = "17 rows at once (of 50 asked), + 16 rows' copies kept for field_probs"
    assert shown in plan.describe()
    few = plan_memory("m", memory, (300, 1_000, 200), 2, budget, 2**30, kept_rows=8)
    assert few.context_bytes(2) == (2 + 4) * row  # no more kept than rows at once
    cache = LlamaCache(floor=4_096, row_extra=0, slack=0, ubatch=512, outputs=1, flash=True)
    tagged = plan_memory("m", memory, (300, 1_000, 200), 50, budget, 2**30, cache, kept_rows=8)
    assert tagged.kept_rows == 0 and tagged.rows == 33
    with pytest.raises(MemoryBudgetError) as refused:  # the sum shown adds up: 1 + 2 rows
        plan_memory("m", memory, (300, 1_000, 200), 8, Budget(17 * 2**29, "x"), 0, kept_rows=8)
    message = " ".join(str(refused.value).split())
    assert "and field_probs' two copies of it kept 422 MiB) = 8.74 GiB" in message, message


def test_field_probs_keeps_no_more_finished_rows_than_the_batch(tiny_kit, monkeypatch):
    """What the plan above counts: on torch, with 2 rows at once, at most 2 finished rows
    wait for their branches' expansion however many rows the call has (8 before: a run
    of many waves kept 8 rows' copies beside a batch of 2)."""
    from muestra.answers.grammar import GrammarSpec
    from muestra.answers.phases import AnswerConfig
    from muestra.answers.structured import StructuredGenerator
    from muestra.models.loading import load_model

    waiting = helpers.count_pending(monkeypatch)
    loaded = load_model(str(tiny_kit), device="cpu", runtime="torch")
    prompt = loaded.tokenizer("Which one?")["input_ids"]
    grammar = GrammarSpec.choice(["caballo", "caballero", "caballería"])
    for rows, most in ((2, 2), (16, 8)):
        waiting.clear()
        samples = StructuredGenerator(loaded, max_batch=rows).run(
            [prompt], n=10, seed=3, answer=AnswerConfig(max_tokens=8), grammar=grammar
        )
        assert all(s.field_probs and "caballero" in s.field_probs["answer"] for s in samples)
        assert max(waiting) == most, (rows, waiting)


SPEC = """
[model]
id = "{model}"

[think]
budget = 24

[answer]
max_tokens = 16
{run}
"""


def _spec(folder: Path, model: Path, samples: int, run: str = "") -> Path:
    return helpers.write_spec(folder, "mem", "", SPEC.format(model=model, run=run), samples=samples)


def test_the_spec_key_is_checked_once_by_name(tmp_path, tiny_kit):
    good = load_spec(_spec(tmp_path, tiny_kit, 2, '[run]\nmax_memory = "6GB"'))
    assert good.spec.run.max_memory == "6GB"
    for bad, shown in (('"lots"', "'lots'"), ("0", "0"), ("true", "True"), ('"-2GiB"', "-2GiB")):
        path = _spec(tmp_path, tiny_kit, 2, f"[run]\nmax_memory = {bad}")
        with pytest.raises(InputError) as refused:
            load_spec(path)
        assert str(refused.value).startswith(f"{path}: run.max_memory: ")
        assert shown in str(refused.value)
    path = _spec(tmp_path, tiny_kit, 2, '[run]\nmax_mem = "6GB"')
    with pytest.raises(InputError, match="unknown key run.max_mem; did you mean 'max_memory'"):
        load_spec(path)


def test_a_row_that_cannot_fit_is_refused_before_the_model_loads(cli, tiny_kit, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    import muestra.models.loading as loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", never)
    spec = _spec(tmp_path, tiny_kit, 3)
    store = tmp_path / "mem.db"
    result = cli("run", str(spec), "--out", str(store), "--max-memory", "30MiB")
    assert result.code == 2, result.stderr
    text = " ".join(result.stderr.split())
    assert "does not fit one row in the memory budget" in text
    assert "the weights take 37.4 MiB" in text  # the tiny kit's float32 weights
    assert "30 MiB (--max-memory 30MiB)" in text
    assert "Raise --max-memory, or lower the think budget" in text
    assert not store.exists()  # the run this command created is gone with its store
    # the spec's key is the budget when no flag is given, and says where it came from
    spec = _spec(tmp_path, tiny_kit, 3, '[run]\nmax_memory = "20MB"')
    result = cli("run", str(spec), "--out", str(store))
    assert result.code == 2 and "[run] max_memory = 20MB" in " ".join(result.stderr.split())


def test_a_budget_of_two_rows_runs_every_sample_two_at_a_time(cli, tiny_kit, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """A budget that admits 2 rows of the 32 asked: every sample is stored, no forward pass
    ever held more than 2 rows, the plan is printed and stored with the run, and the
    samples equal those of the same run without a budget."""
    monkeypatch.setattr(planning, "resident_bytes", lambda: 0)  # the plan starts from zero
    rows_seen = helpers.count_feeds(monkeypatch)
    spec = _spec(tmp_path, tiny_kit, 5)
    memory = model_memory(check_model(str(tiny_kit)), "torch")
    loaded = load_spec(spec)
    from muestra.experiments.runner import Runner

    with Runner(loaded, tmp_path / "probe.db") as runner:  # the rows' tokens, as planned
        runner.open()
        (plan,) = planning.plan_models(loaded, runner.plan(), 32, Budget(2**40, "x")).values()
    rows = 2 * plan.kv_bytes_per_row + plan.kv_bytes_per_row // 2
    budget = RUN_RESERVE + memory.weights_bytes + rows
    capped = tmp_path / "capped.db"
    result = cli("run", str(spec), "--out", str(capped), "--max-memory", str(budget))
    assert result.code == 0, result.stderr
    assert "2 rows at once (of 32 asked)" in result.stderr
    assert rows_seen and max(rows_seen) == 2, rows_seen
    with closing(sqlite3.connect(capped)) as db:
        counts = db.execute("SELECT prompt_id, count(*) FROM samples GROUP BY prompt_id")
        assert [n for _, n in counts] == [5, 5]
        (stored,) = [json.loads(r[0]) for r in db.execute("SELECT plan_json FROM memory_plans")]
        capped_samples = db.execute(
            "SELECT prompt_id, sample_index, reasoning, answer_text FROM samples ORDER BY 1, 2"
        ).fetchall()
    assert stored["rows"] == 2 and stored["rows_asked"] == 32
    assert stored["budget_bytes"] == budget and stored["held_bytes"] == 0
    assert stored["budget_source"] == f"--max-memory {budget}"
    assert stored["weights_bytes"] == memory.weights_bytes
    assert stored["kv_bytes_per_row"] == plan.kv_bytes_per_row
    assert stored["reserve_bytes"] == RUN_RESERVE
    peak = RUN_RESERVE + memory.weights_bytes + 2 * plan.kv_bytes_per_row
    assert stored["peak_bytes"] == peak <= budget
    rows_seen.clear()
    free = tmp_path / "free.db"
    result = cli("run", str(spec), "--out", str(free), "--max-memory", "64GiB")
    assert result.code == 0 and max(rows_seen) > 2, rows_seen
    with closing(sqlite3.connect(free)) as db:
        free_samples = db.execute(
            "SELECT prompt_id, sample_index, reasoning, answer_text FROM samples ORDER BY 1, 2"
        ).fetchall()
    assert capped_samples == free_samples


def test_max_memory_is_refused_where_nothing_computes_locally(tmp_path):
    from muestra.experiments.run_settings import run_settings

    spec = helpers.write_spec(tmp_path, "remote", '[model]\nid = "m"\nendpoint = "http://x/v1"')
    with pytest.raises(InputError, match="--max-memory: applies to models this machine"):
        run_settings(load_spec(spec), model_options={"max_memory": "8GiB"})


def test_the_notebook_takes_max_memory(tiny_kit, tmp_path, monkeypatch):
    import muestra.models.loading as loading
    import muestra.notebook as mn

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", never)
    spec = _spec(tmp_path, tiny_kit, 2)
    with pytest.raises(MemoryBudgetError, match=r"--max-memory 10MB\)"):
        mn.experiment(spec, tmp_path / "nb.db", max_memory="10MB", progress=False)
    assert not (tmp_path / "nb.db").exists()


@pytest.mark.parametrize("schema", [True, False], ids=["schema", "free text"])
def test_the_plan_measures_the_process_with_the_vocabulary_side_loaded(
    smol_kit, tmp_path, monkeypatch, schema
):
    """`held` is read while the tokenizer, llama.cpp's vocabulary and (for an answer under
    a grammar) xgrammar's token tables are alive, as the run will hold them; all are
    freed after (a Qwen3-4B run's peak was 0.29 GiB over the plan that read `held` before
    them, measured)."""
    import muestra.answers.grammar as grammar
    import muestra.models.runtime.llamacpp_runtime as llamacpp
    from muestra.experiments.runner import Runner

    alive = {"tables": 0, "vocabulary": 0}
    seen = []
    init = grammar.GrammarBackend.__init__
    vocabulary_only = llamacpp.vocabulary_only

    def tables(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive["tables"] += 1
        weakref.finalize(self, lambda: alive.update(tables=alive["tables"] - 1))

    @contextlib.contextmanager
    def vocabulary(gguf):
        with vocabulary_only(gguf) as size:
            alive["vocabulary"] += 1
            yield size
        alive["vocabulary"] -= 1

    def resident():
        seen.append(dict(alive))
        return 100 * 2**20

    monkeypatch.setattr(grammar.GrammarBackend, "__init__", tables)
    monkeypatch.setattr(llamacpp, "vocabulary_only", vocabulary)
    monkeypatch.setattr(planning, "resident_bytes", resident)
    choice = 'choice = ["sí", "no"]' if schema else ""
    body = f'[model]\nid = "{smol_kit}"\nruntime = "llamacpp"\n[answer]\nmax_tokens = 16\n{choice}'
    loaded = load_spec(helpers.write_spec(tmp_path, "mem", "", body, samples=2))
    with Runner(loaded, tmp_path / "plan.db") as runner:
        runner.open()
        (plan,) = planning.plan_models(loaded, runner.plan(), 4, Budget(2**40, "x")).values()
    gc.collect()
    assert plan.held_bytes == 100 * 2**20
    assert seen == [{"tables": int(schema), "vocabulary": 1}]  # the one measurement
    assert alive == {"tables": 0, "vocabulary": 0}  # freed after it
