"""GGUF files as models: find the file, name its architecture, dequantize it with transformers.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, which needs the
`gguf` and `accelerate` packages) and dequantizes every tensor into an ordinary torch
model, for the architectures it maps (llama, qwen2/3, gpt2, mistral, …). The weights are
then exactly the quantized ones, widened: close to, not equal to, the original
checkpoint's. The header is checked first (`gguf_header.py`: a damaged or crafted one is
one `InputError` naming the file and the field); anything transformers then cannot map or
load is one `InputError` naming the file and the architecture. Loading a GGUF takes
seconds (the tokenizer is rebuilt from the file's metadata, then kept in muestra's cache:
`load_gguf_tokenizer`); `muestra kit build` does it once and saves an ordinary
safetensors folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from muestra.errors import InputError, ModelNotFoundError
from muestra.models.gguf_header import read_gguf_header
from muestra.paths import cache_dir

GGUF_SUFFIX = ".gguf"
# a kept tokenizer's flags that `save_pretrained` does not write (transformers 5 rebuilds
# Gemma's with add_bos_token True and reads it back as False; the BOS is added either way)
SAVED_FLAGS = ("add_bos_token", "add_eos_token")
KEPT_FLAGS = "muestra-flags.json"


def find_gguf(path: Path, beside_weights: bool = False) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a folder (that
    holds no safetensors weights, unless `beside_weights`: a kit keeps both). None when
    `path` has no GGUF."""
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (not beside_weights and any(path.glob("*.safetensors"))):
        return None
    files = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise InputError(
            f"{path} holds several GGUF files ({names}); pass the path of the one to load"
        )
    return files[0] if files else None


def gguf_architecture(file: Path) -> str:
    """The `general.architecture` field of a GGUF file (e.g. "llama"); an `InputError`
    naming the file and the fault for a damaged or crafted header (`gguf_header.py`)."""
    return read_gguf_header(file).architecture


def _require_packages() -> None:
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModelNotFoundError(
            f"loading a GGUF file needs the package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )


@contextmanager
def _parsed_once() -> Iterator[None]:
    """While loading one model: each GGUF file's header parsed once, each tensor-name map
    built once.

    transformers reads a GGUF three times (config, tokenizer, weights), each time through a
    new `gguf.GGUFReader` (~4 s for SmolLM2's file here: its 49k-token vocabulary walked
    through numpy memmap views), and builds gguf's `TensorNameMap` again for every tensor
    (397 times, ~6 s). It imports both names from `gguf` inside the functions that use
    them, so for the duration of the load they are swapped for memoized ones: the same
    reader object (read-only; its tensors are memmap views) and the same name map.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def load_gguf_tokenizer(file: Path) -> Any:
    """The transformers tokenizer transformers rebuilds from a GGUF's metadata.

    Rebuilding walks every token of the vocabulary through `gguf`'s reader and converts
    it: 9 s for SmolLM2's 49,152 tokens and 47 s for Gemma 3's 262,144 on 2 cores, paid
    by every command that reads a bare GGUF (twice by a run: its memory plan counts the
    prompts' tokens before the model loads). So the rebuilt tokenizer is saved in
    muestra's cache (`tokenizers/` under `paths.cache_dir()`), named by a hash of the
    file's header (the metadata it is rebuilt from) and of transformers' version, and
    read back from there (0.2 s and ~5 s). A cache that cannot be written or read only
    costs the time."""
    from transformers import AutoTokenizer

    _require_packages()
    header = read_gguf_header(file)  # a damaged header is refused here, by name
    architecture = header.architecture
    kept = _tokenizer_cache(file, header.data_offset)
    if kept.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(kept))
            flags = json.loads((kept / KEPT_FLAGS).read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 — a damaged cache entry: rebuild it below
            shutil.rmtree(kept, ignore_errors=True)
        else:
            for name, value in flags.items():  # what save_pretrained leaves out
                if getattr(tokenizer, name, value) != value:
                    setattr(tokenizer, name, value)
            tokenizer.name_or_path = str(file.parent)  # as the rebuilt one says
            return with_chat_template(tokenizer, file)
    try:
        with _parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as err:
        raise InputError(
            f"{file}: transformers cannot rebuild the tokenizer of this GGUF (architecture "
            f"{architecture!r}: {_first_line(err)}); put its tokenizer.json beside the file"
        ) from err
    _keep_tokenizer(tokenizer, kept)
    return with_chat_template(tokenizer, file)


def _tokenizer_cache(file: Path, header_bytes: int) -> Path:
    """Where the tokenizer rebuilt from `file` is kept: a hash of its first
    `header_bytes` bytes (metadata and tensor index: the vocabulary, its scores and
    merges, the special tokens) and of the transformers version that rebuilt it."""
    import transformers

    digest = hashlib.sha256(f"transformers {transformers.__version__}\n".encode())
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(min(1 << 20, header_bytes - handle.tell())), b""):
            digest.update(chunk)
    return cache_dir() / "tokenizers" / digest.hexdigest()[:32]


def _keep_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save `tokenizer` into `folder` whole or not at all (written beside it, then
    renamed: two processes rebuilding the same file at once keep one copy)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError:
        return  # a read-only cache: the next load rebuilds it again
    try:
        tokenizer.save_pretrained(str(scratch))
        flags = {name: getattr(tokenizer, name) for name in SAVED_FLAGS if hasattr(tokenizer, name)}
        (scratch / KEPT_FLAGS).write_text(json.dumps(flags), encoding="utf-8")
        scratch.rename(folder)
    except Exception:  # noqa: BLE001 — kept by another process first, a full disk: not kept
        shutil.rmtree(scratch, ignore_errors=True)


def with_chat_template(tokenizer: Any, file: Path) -> Any:
    """`tokenizer` with the GGUF's own chat template (`tokenizer.chat_template`), which
    transformers' GGUF tokenizer leaves out: a chat model served from its bare GGUF file
    keeps its chat format (its template is what llama.cpp itself would apply)."""
    if not getattr(tokenizer, "chat_template", None):
        template = read_gguf_header(file).metadata.get("tokenizer.chat_template")
        if isinstance(template, str) and template.strip():
            tokenizer.chat_template = template
    return tokenizer


def load_gguf(file: Path, dtype: Any = "auto") -> tuple[Any, Any]:
    """Dequantize `file` into a transformers causal LM (eval mode) and its tokenizer;
    `dtype`: a torch dtype, or "auto" for float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    _require_packages()
    architecture = gguf_architecture(file)  # a damaged header is refused here, by name
    folder, name = str(file.parent), file.name
    try:
        with _parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=name,
                dtype=torch.float32 if dtype == "auto" else dtype,
                # Widen every tensor into plain nn.Linear weights, whatever kernels exist.
                quantization_config=GgufConfig(dequantize=True),
            )
    except Exception as err:
        # the header is sound (checked above): what transformers could not do with the
        # file's content (an architecture it does not map, a tensor or key it lacks)
        if isinstance(err, ValueError) and "not supported" in str(err):
            supported = ", ".join(sorted(GGUF_SUPPORTED_ARCHITECTURES))
            raise InputError(
                f"{file}: GGUF architecture {architecture!r} cannot be loaded by transformers "
                f"(it maps: {supported}). Use the original checkpoint (safetensors) instead."
            ) from err
        raise InputError(
            f"{file}: transformers cannot load this {architecture!r} GGUF "
            f"({type(err).__name__}: {_first_line(err)}); check that the file is a complete "
            "model (llama.cpp's convert_hf_to_gguf.py writes one), or use the original "
            "checkpoint"
        ) from err
    # Once dequantized nothing is quantized any more: detach the GGUF quantizer so the
    # model is an ordinary one (and `save_pretrained` writes plain safetensors).
    model.hf_quantizer = None
    tokenizer = with_chat_template(tokenizer, file)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    return model.eval(), tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
