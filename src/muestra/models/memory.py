"""What a model will take in memory, read from its files before its weights load.

Two numbers decide how many rows of a batch fit in a memory budget
(`experiments/planning.py`):

- **the weights**: the bytes of every weight tensor, from the files' own headers (a
  safetensors header lists each tensor's dtype and shape, a GGUF header each tensor's
  size): what the runtime holds once loaded. Converted when the runtime converts: torch
  dequantizes a GGUF to float32 (or the dtype asked for), and `dtype` other than "auto"
  casts safetensors weights.
- **the KV cache per token**: every layer keeps one key and one value vector per KV head
  for every token a row holds, so

      bytes/token = layers × KV heads × (key length + value length) × bytes per element

  read from the model's own config (`config.json`: num_hidden_layers,
  num_key_value_heads, head_dim or hidden_size / num_attention_heads; the element is the
  torch dtype the runtime computes in) or from its GGUF metadata (`{arch}.block_count`,
  `{arch}.attention.head_count_kv`, `{arch}.attention.key_length` / `value_length`; the
  element is llama.cpp's cache type: f16 is 2 bytes, q8_0 34 bytes per block of 32).

A Qwen3-4B (36 layers, 8 KV heads × 128, f16) holds 36 × 8 × 256 × 2 = 147,456 bytes
(144 KiB) per token: 50 rows of 1,500 tokens are 11 GB.

Sliding-window layers (Gemma 3) are counted as full layers. On llama.cpp that is exact:
muestra's contexts keep full-size sliding-window caches (`swa_full`, so rows can be cropped
and copied). On torch it is an upper bound: a sliding layer holds at most its window.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.errors import InputError
from muestra.models.gguf_header import GGUFHeader, read_gguf_header

# bytes per element of the torch dtypes a model computes (and caches) in
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# safetensors' dtype names → bytes per element
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
# llama.cpp KV cache types: (bytes per block, elements per block)
KV_CACHE_TYPES = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32)}
DEFAULT_KV_CACHE = "f16"  # llama.cpp's default, and the one muestra's runtime makes
RUNTIME_KV_CACHES = ("f16", "q8_0")  # the types muestra runs llama.cpp with (--kv-cache)

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
SIZE_HELP = 'a size such as "8GiB", "12GB", "500MiB" or a plain byte count'


def parse_memory(value: Any, where: str) -> int:
    """Bytes of a memory size ("8GiB", "12GB", "500MiB", 8000000000, "8e9" is refused);
    an `InputError` naming `where` and the value otherwise. GB is 10⁹ bytes, GiB 2³⁰."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError(f"{where}: {value!r} is not {SIZE_HELP}")
    if isinstance(value, int):
        if value < 1:
            raise InputError(f"{where}: {value} bytes; give a size above zero ({SIZE_HELP})")
        return value
    found = SIZE.match(value)
    unit = found.group(2).upper() if found else ""
    if found is None or unit not in UNITS:
        raise InputError(f"{where}: {value!r} is not {SIZE_HELP} (units: B, KB, MB, GB, TB, "
                         "KiB, MiB, GiB, TiB)")  # fmt: skip
    size = int(float(found.group(1)) * UNITS[unit])
    if size < 1:
        raise InputError(f"{where}: {value!r} is zero bytes; give a size above zero")
    return size


class MemoryUnknown(InputError):
    """A model whose files do not say what its KV cache takes (e.g. per-layer head counts,
    which the GGUF header reader keeps only as an array's length)."""


@dataclass(frozen=True)
class LlamaBuffers:
    """What llama.cpp allocates for a context beside the weights and the KV cache, from
    the model's shape (`vocab` tokens, `heads` query heads, `per_token` floats a batch's
    token holds outside attention: 3 × feed-forward length + 2 × embedding length):

    - the **output buffer**: the logits of up to `outputs` rows, vocab × outputs × 4
      bytes (llama.cpp makes it for one row a sequence, 256, and grows it when a batch
      asks for more logits, up to `outputs`);
    - the **compute buffer** (the graph's intermediate tensors for one micro-batch of
      `ubatch` tokens): the larger of the logits and, without flash attention, the
      attention scores with their mask (cells × ubatch × (heads + 1) × 4 bytes), plus
      the micro-batch's other activations (ubatch × per_token × 4 bytes).

    An upper bound of llama.cpp's own numbers (its log, with muestra's contexts; tests/
    test_memory_plan.py checks it on the test models). On a Qwen3-4B shape, output +
    compute buffers: exact batching (63-token micro-batches, flash attention) 148 + 153
    MiB at any context, counted 148 + 157; free batching (512 tokens, no flash attention)
    148 + 307 MiB at 4,096 cells, counted 297 + 364, and 148 + 1,091 MiB at 16,384 cells,
    counted 297 + 1,123. Without flash attention the scores grow with the context:
    ~64 KiB a cell on that shape, 1 GiB at 16,384 cells."""

    vocab: int
    heads: int
    per_token: int

    def output_bytes(self, outputs: int) -> int:
        return self.vocab * outputs * 4

    def compute_bytes(self, cells: int, ubatch: int, outputs: int, flash: bool) -> int:
        scores = 0 if flash else cells * ubatch * (self.heads + 1) * 4
        return max(self.output_bytes(outputs), scores) + ubatch * self.per_token * 4

    def bytes(self, cells: int, ubatch: int, outputs: int, flash: bool) -> int:
        """Output and compute buffers of a `cells`-cell context (see the class)."""
        return self.output_bytes(outputs) + self.compute_bytes(cells, ubatch, outputs, flash)


def cells_within(
    room: int,
    per_cell: int,
    buffers: LlamaBuffers | None,
    shape: tuple[int, int, bool],
    step: int = 256,
) -> int:
    """The most KV cells, in whole `step`s, whose cache (`per_cell` bytes a cell) and
    buffers (llama.cpp's, for a context of `shape`: micro-batch, rows of logits, flash
    attention) fit `room` bytes; 0 when not one step does."""

    def fits(cells: int) -> bool:
        extra = 0 if buffers is None else buffers.bytes(cells, *shape)
        return cells * per_cell + extra <= room

    low, high = 0, max(0, room) // per_cell // step
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle * step) else (low, middle - 1)
    return low * step


@dataclass(frozen=True)
class ModelMemory:
    """What a model takes: its weights, its KV cache per token of one row, and (llama.cpp)
    its context's other buffers."""

    weights_bytes: int
    kv_bytes_per_token: int
    source: str  # where the numbers were read, e.g. "config.json, bfloat16 cache"
    buffers: LlamaBuffers | None = None


def kv_bytes_per_token_from_config(config: Mapping[str, Any], dtype: str) -> int:
    """KV cache bytes per token of a transformers `config.json` (as a dict) whose cache
    holds `dtype` elements. A multimodal config's `text_config` is the language model."""
    if isinstance(config.get("text_config"), Mapping):
        config = {**config["text_config"]}
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None:
        raise MemoryUnknown(
            "config.json names neither num_hidden_layers nor num_attention_heads (or their "
            "GPT-2 names n_layer, n_head): its KV cache cannot be planned"
        )
    kv_heads = config.get("num_key_value_heads") or (1 if config.get("multi_query") else heads)
    head_dim = config.get("head_dim")
    if not head_dim:
        if hidden is None:
            raise MemoryUnknown("config.json has no head_dim and no hidden_size")
        head_dim = int(hidden) // int(heads)
    if dtype not in TORCH_DTYPE_BYTES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPE_BYTES)}")
    return int(layers) * int(kv_heads) * 2 * int(head_dim) * TORCH_DTYPE_BYTES[dtype]


def kv_bytes_per_token_from_gguf(header: GGUFHeader, cache_type: str = DEFAULT_KV_CACHE) -> int:
    """KV cache bytes per token (one cell) of a GGUF model run by llama.cpp with keys and
    values of `cache_type` (f16, q8_0, …): what llama.cpp's own `llama_kv_cache` sizes."""
    if cache_type not in KV_CACHE_TYPES:
        raise InputError(f"KV cache type {cache_type!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    arch = header.architecture
    meta = header.metadata

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, tuple):  # ("array", type, length): per-layer values
            raise MemoryUnknown(
                f"{header.path}: {arch}.{key} differs per layer; muestra cannot plan this "
                "model's KV cache (run it without --max-memory / [run] max_memory)"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MemoryUnknown(f"{header.path}: {arch}.{key} is missing or not a count")
        return value

    layers = number("block_count")
    heads = number("attention.head_count")
    kv_heads = number("attention.head_count_kv", heads)
    head_dim = number("embedding_length") // heads if heads else 0
    key_length = number("attention.key_length", head_dim)
    value_length = number("attention.value_length", head_dim)
    size, block = KV_CACHE_TYPES[cache_type]
    elements = kv_heads * (key_length + value_length)  # per layer and token
    return layers * elements * size // block


def safetensors_tensors(file: Path) -> list[tuple[str, int]]:
    """(dtype, element count) of each tensor in a safetensors file, from its header."""

    def unreadable(why: str) -> InputError:
        return InputError(
            f"the model did not load: {file} is not a readable safetensors file ({why}); "
            "it is damaged or not safetensors: build or copy the model again"
        )

    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise unreadable(f"{len(head)} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 2**20 or length > file.stat().st_size:
            raise unreadable(f"header of {length} bytes")
        try:
            header = json.loads(handle.read(length))
            found = []
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                found.append((str(entry["dtype"]), count))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise unreadable(f"its header: {type(err).__name__}") from None
    return found


def safetensors_bytes(files: list[Path], dtype: str) -> int:
    """Bytes of the weights of safetensors `files` in memory: as stored ("auto"), or every
    floating tensor cast to `dtype`."""
    total = 0
    for file in files:
        for stored, count in safetensors_tensors(file):
            size = SAFETENSORS_BYTES.get(stored, 4)
            if dtype != "auto" and stored in ("F64", "F32", "F16", "BF16"):
                size = TORCH_DTYPE_BYTES[dtype]
            total += count * size
    return total


def llama_buffers_from_gguf(header: GGUFHeader) -> LlamaBuffers:
    """The shape `LlamaBuffers` counts, from a GGUF's metadata (the vocabulary is the
    length of `tokenizer.ggml.tokens`; a feed-forward length the header keeps only as a
    per-layer array counts as 8 × the embedding length, a guess above common shapes)."""
    arch = header.architecture
    meta = header.metadata

    def number(key: str) -> int | None:
        value = meta.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value if ok else None  # type: ignore[return-value]

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = tokens[2] if isinstance(tokens, tuple) else number(f"{arch}.vocab_size")
    heads = number(f"{arch}.attention.head_count")
    embedding = number(f"{arch}.embedding_length")
    if not (vocab and heads and embedding):
        raise MemoryUnknown(
            f"{header.path}: its vocabulary, head count or embedding length is missing from "
            "the GGUF metadata; muestra cannot plan llama.cpp's buffers for it"
        )
    feed_forward = number(f"{arch}.feed_forward_length") or 8 * embedding
    return LlamaBuffers(vocab, heads, 3 * feed_forward + 2 * embedding)


def gguf_weights_bytes(header: GGUFHeader, dtype: str | None = None) -> int:
    """Bytes of a GGUF's weights: as stored (`dtype` None: what llama.cpp maps), or
    dequantized to the torch `dtype` (what transformers makes of it)."""
    if dtype is None:
        return sum(t.nbytes for t in header.tensors)
    each = TORCH_DTYPE_BYTES[dtype]
    total = 0
    for tensor in header.tensors:
        count = 1
        for dim in tensor.shape:
            count *= dim
        total += count * each
    return total


def config_dtype(config: Mapping[str, Any]) -> str:
    """The dtype transformers loads a model in with dtype="auto": the config's own
    (`dtype`, or `torch_dtype` before transformers 5), else float32."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}
    for source in (config, text):
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if isinstance(value, str) and value in TORCH_DTYPE_BYTES:
                return value
    return "float32"


def model_memory(
    files: Any, runtime: str, dtype: str = "auto", kv_cache: str | None = None
) -> ModelMemory:
    """What the model in `files` (a `loading.ModelFiles`) takes on `runtime` ("torch" or
    "llamacpp") with the torch `dtype` asked for (llama.cpp: its `kv_cache` type, f16 by
    default); read from headers and config only."""
    if runtime == "llamacpp":
        header = read_gguf_header(files.gguf)
        cache = kv_cache or DEFAULT_KV_CACHE
        return ModelMemory(
            gguf_weights_bytes(header),
            kv_bytes_per_token_from_gguf(header, cache),
            f"GGUF metadata, {cache} KV cache",
            llama_buffers_from_gguf(header),
        )
    if files.gguf is not None and not files.weights_are_folder:  # dequantized by torch
        header = read_gguf_header(files.gguf)
        torch_dtype = "float32" if dtype == "auto" else dtype
        kv = _gguf_kv_in_torch(header, torch_dtype)
        return ModelMemory(
            gguf_weights_bytes(header, torch_dtype), kv, f"GGUF metadata, {torch_dtype} cache"
        )
    config = _config(files.folder)
    torch_dtype = config_dtype(config) if dtype == "auto" else dtype
    if files.safetensors:
        weights = safetensors_bytes(list(files.weights), dtype)
    else:  # pickle weights: their file sizes
        weights = sum(Path(f).stat().st_size for f in files.weights)
    kv = kv_bytes_per_token_from_config(config, torch_dtype)
    return ModelMemory(weights, kv, f"config.json, {torch_dtype} cache")


def _gguf_kv_in_torch(header: GGUFHeader, dtype: str) -> int:
    """A GGUF's KV bytes per token once torch computes it in `dtype` elements."""
    f16 = kv_bytes_per_token_from_gguf(header, "f16")
    return f16 // 2 * TORCH_DTYPE_BYTES[dtype]


def _config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise MemoryUnknown(
            f"{path}: not readable ({err}); its KV cache cannot be planned"
        ) from err
    if not isinstance(data, dict):
        raise MemoryUnknown(f"{path}: not a JSON object; its KV cache cannot be planned")
    return data


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None
