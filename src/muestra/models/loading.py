"""Load a model and its tokenizer from a Hub id, a local folder or a GGUF file — the only
place that does.

A kit folder, a downloaded snapshot and any other local folder go through the same
code; a `.gguf` file (or a folder holding one and no safetensors) is dequantized by
transformers (`muestra.models.gguf`). A Hub id is first resolved to a snapshot folder in
the local Hugging Face cache (downloading only when allowed and reachable), then
everything loads from a folder. Safetensors only unless `allow_pickle=True`; remote code only with
`trust_remote_code=True`. The result carries provenance: the model id, the commit
of a Hub snapshot when known, and a content hash of the weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

from muestra.errors import InputError, ModelNotFoundError, UnsafeModelError
from muestra.models.gguf import GGUF_SUFFIX, find_gguf, load_gguf

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def offline_hint(ref: str) -> str:
    return (
        f"model {ref!r} is not in the local Hugging Face cache and cannot be downloaded "
        "here. Fix it one of three ways: build a stand-in with `muestra kit build --preset "
        "tiny` and pass its folder; pass a local folder that holds the model; or allow "
        "network access to the Hub (unset HF_HUB_OFFLINE) and retry."
    )


@dataclass(frozen=True)
class Provenance:
    """Where a model came from, enough to find the same weights again."""

    model_id: str
    path: str
    source: Literal["local", "hub"]
    revision: str | None
    weights_sha256: str | None
    kit_preset: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    provenance: Provenance

    @property
    def eos_token_ids(self) -> list[int]:
        """Every EOS id of the generation config (falling back to the model config)."""
        source = self.model.generation_config.eos_token_id
        if source is None:
            source = self.model.config.eos_token_id
        if source is None:
            return []
        return [int(source)] if isinstance(source, int) else [int(i) for i in source]

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer, which masks and biases must match (not len(tokenizer))."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_length(self) -> int | None:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref


def resolve_model(
    ref: str,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Path, Literal["local", "hub"], str | None]:
    """The local folder (or GGUF file) for `ref`, its source and its Hub commit (None for
    local paths)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix.lower() != GGUF_SUFFIX:
            raise ModelNotFoundError(
                f"model {ref!r} is a file; pass the folder that holds it (or a .gguf file)"
            )
        return path, "local", None
    if _looks_like_path(ref):
        raise ModelNotFoundError(
            f"no model folder at {ref!r}. Build an offline one with "
            f"`muestra kit build --preset tiny --out {ref}`, or check the path."
        )
    return _hub_snapshot(ref, revision, allow_pickle, trust_remote_code)


def _hub_snapshot(
    repo_id: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool
) -> tuple[Path, Literal["hub"], str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    patterns += ["*.py"] if trust_remote_code else []
    folder = None
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
        )
    except HFValidationError as err:
        raise InputError(f"{repo_id!r} is neither a folder nor a valid Hub id ({err})") from err
    except Exception:  # not cached: try the network unless told not to
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
            raise ModelNotFoundError(offline_hint(repo_id)) from None
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as err:
            raise ModelNotFoundError(offline_hint(repo_id)) from err
    path = Path(folder)
    commit = path.name if path.parent.name == "snapshots" else None
    return path, "hub", commit


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return safetensors, pickles


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def weights_hash(files: list[Path]) -> str:
    """sha256 over the sha256 of each weight file (name and content), in name order."""
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(file.name.encode() + b"\0")
        digest.update(_sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def _kit_preset(folder: Path) -> str | None:
    manifest = folder / "muestra-kit.json"
    if manifest.is_file():
        return json.loads(manifest.read_text("utf-8")).get("preset")
    return None


def load_tokenizer(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `ref` (a folder or Hub id), without loading weights."""
    from transformers import AutoTokenizer

    folder, source, _ = resolve_model(ref, revision, trust_remote_code=trust_remote_code)
    gguf = find_gguf(folder) if source == "local" else None
    try:
        if gguf is not None:
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"no usable tokenizer in {folder} ({err}). The folder needs tokenizer.json or "
            "the tokenizer files of its model."
        ) from err


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device; use cpu")
    return torch.device(device)


def resolve_dtype(dtype: Dtype) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise InputError(f"dtype {dtype!r} is not one of auto, bfloat16, float16, float32")
    return getattr(torch, dtype)


def load_model(
    ref: str,
    *,
    dtype: Dtype = "auto",
    device: Device = "auto",
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; see the module docstring for the rules."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, source, commit = resolve_model(ref, revision, allow_pickle, trust_remote_code)
    gguf = find_gguf(folder) if source == "local" else None
    if gguf is not None:
        model, tokenizer = load_gguf(gguf, resolve_dtype(dtype))
        return _loaded(ref, gguf, source, None, [gguf], model.to(resolve_device(device)), tokenizer)
    safetensors, pickles = _weight_files(folder)
    if not safetensors and pickles and not allow_pickle:
        names = ", ".join(p.name for p in pickles)
        raise UnsafeModelError(
            f"{folder} has only pickle weights ({names}); loading them can run arbitrary "
            "code. Convert them to safetensors, or pass --allow-pickle if you trust the source."
        )
    if not safetensors and not pickles:
        raise ModelNotFoundError(
            f"no weights in {folder} (expected *.safetensors). For an offline stand-in run "
            "`muestra kit build --preset tiny`."
        )
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=resolve_dtype(dtype),
        use_safetensors=bool(safetensors),
        trust_remote_code=trust_remote_code,
    )
    model.to(target).eval()
    return _loaded(ref, folder, source, commit, safetensors or pickles, model, tokenizer)


def _loaded(
    ref: str,
    path: Path,
    source: Literal["local", "hub"],
    commit: str | None,
    weights: list[Path],
    model: Any,
    tokenizer: Any,
) -> LoadedModel:
    provenance = Provenance(
        model_id=ref,
        path=str(path.resolve()),
        source=source,
        revision=commit or getattr(model.config, "_commit_hash", None),
        weights_sha256=weights_hash(weights),
        kit_preset=_kit_preset(path) if path.is_dir() else None,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, provenance=provenance)
