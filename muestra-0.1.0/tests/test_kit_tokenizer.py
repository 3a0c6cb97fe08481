"""The kit's Qwen3 tokenizer reproduces the official ids and template."""

from __future__ import annotations

import random
import unicodedata

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from muestra.models.inspection import render_chat, tokenize
from muestra.models.kit.tokenizer import ADDED_TOKENS, QWEN_PRETOKENIZE_PATTERN, qwen_tiktoken_path
from muestra.models.loading import load_tokenizer

SEED_001_IDS = [43617, 409, 1375, 4589, 25, 926, 7305, 11, 12376, 360]
SEED_003_IDS = [
    151644, 8948, 198, 2610, 525, 264, 10950, 17847, 11, 714, 498, 646, 944, 1977, 279,
    3409, 72600, 624, 7771, 829, 374, 1863, 10920, 80, 301, 13, 151645, 198, 151644, 872,
    198, 4340, 1657, 19215, 525, 304, 279, 3409, 72600, 30, 151645, 198, 151644, 77091, 198,
    151667, 198,
]  # fmt: skip
SEED_003_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant, but you can't say the word strawberry.\n"
        "Your name is Zyrqel.",
    },
    {"role": "user", "content": "How many Rs are in the word strawberry?"},
]

CORPUS = [
    "Lista de colores: rojo, azul",
    "¿Dónde está el niño? Añoranza, pingüino, ÁÉÍÓÚ ñandú, cigüeña.",
    "Soy una persona fuerte, con mucho carisma y dotes de liderazgo.",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇪🇸 ✨",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\n\tif x != 0:\n\t\tpass\n",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "   leading spaces    and\ttabs\t\t\n\r\n  \n",
    "1234567890 3.14159 -42 1e10 2026-11-21 $1,000.00",
    "I'm you're they've we'll he'd it's DON'T She'S",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...---___===+++ <html><body>&nbsp;</body></html>",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_kit):
    return load_tokenizer(str(tiny_kit))


@pytest.fixture(scope="module")
def reference():
    ranks = load_tiktoken_bpe(str(qwen_tiktoken_path()))
    return tiktoken.Encoding(
        "qwen-reference",
        pat_str=QWEN_PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={},
    )


def test_seed_001_vector(tokenizer):
    assert tokenize(tokenizer, "Lista de colores: rojo, azul").ids == SEED_001_IDS


def test_seed_003_chat_prompt(tokenizer):
    text, ids = render_chat(tokenizer, SEED_003_MESSAGES)
    assert ids == SEED_003_IDS
    assert text.endswith("<|im_start|>assistant\n<think>\n")


def test_added_tokens_at_official_ids(tokenizer):
    assert len(tokenizer) == 151669
    for offset, (content, special) in enumerate(ADDED_TOKENS):
        token_id = 151643 + offset
        assert tokenizer.convert_ids_to_tokens(token_id) == content
        assert tokenizer(content, add_special_tokens=False)["input_ids"] == [token_id]
        decoded = tokenizer.decode([token_id], skip_special_tokens=True)
        assert (decoded == "") is special, content
    assert tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token_id == 151643


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCXYZáéíóúñüÁÉÑ  \n\t\r0123456789.,;:'\"!?¿¡()[]{}<>/\\|"
        "@#$%^&*-_=+`~日本中文한😀ß€"
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(count)]


def test_matches_tiktoken_on_broad_corpus(tokenizer, reference):
    texts = CORPUS + _random_texts(2000, seed=7)
    mismatches = [
        t
        for t in texts
        if tokenize(tokenizer, t).ids != reference.encode_ordinary(unicodedata.normalize("NFC", t))
    ]
    assert mismatches == []


def test_nfc_normalisation_as_official(tokenizer):
    composed = "canción"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tokenize(tokenizer, decomposed).ids == tokenize(tokenizer, composed).ids


def test_roundtrip_decode(tokenizer):
    for text in CORPUS:
        ids = tokenize(tokenizer, text).ids
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_multi_turn_keeps_only_final_answers_of_earlier_turns(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    text, _ = render_chat(tokenizer, messages)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_last_assistant_turn_after_query_keeps_reasoning(tokenizer):
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "R"},
    ]
    text, _ = render_chat(tokenizer, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    )


def test_hybrid_enable_thinking(hybrid_kit):
    tok = load_tokenizer(str(hybrid_kit))
    messages = [{"role": "user", "content": "Hola"}]
    on, _ = render_chat(tok, messages)
    off, off_ids = render_chat(tok, messages, enable_thinking=False)
    explicit_on, _ = render_chat(tok, messages, enable_thinking=True)
    assert on == explicit_on == "<|im_start|>user\nHola<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert off_ids[-4:] == [151667, 271, 151668, 271]
