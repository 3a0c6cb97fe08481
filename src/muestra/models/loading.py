"""Load a model and its tokenizer from a Hub id, a local folder or a GGUF file — the only
place that does.

A kit folder, a downloaded snapshot and any other local folder go through the same
code. What computes is the *runtime* (`muestra.models.runtime`): `llamacpp` runs a GGUF
file (a `.gguf`, or the one `.gguf` in a folder) with llama.cpp, `torch` runs a
transformers model (safetensors, or a GGUF dequantized by transformers:
`muestra.models.gguf`). `runtime="auto"` follows the weights: a GGUF alone runs on
llama.cpp when llama-cpp-python is installed, transformers weights on torch. A Hub id is
first resolved to a snapshot folder in the local Hugging Face cache (downloading only
when allowed and reachable), then everything loads from a folder. Safetensors only
unless `allow_pickle=True`; remote code only with `trust_remote_code=True`. The result
carries provenance: the model id, the commit of a Hub snapshot when known, a content
hash of the weight files, and what computes (the runtime's versions and settings).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from muestra.errors import InputError, ModelLoadError, ModelNotFoundError, UnsafeModelError
from muestra.limits import check_threads
from muestra.models.gguf import (
    GGUF_SUFFIX,
    find_gguf,
    gguf_architecture,
    load_gguf,
    load_gguf_tokenizer,
)
from muestra.models.gguf_header import read_gguf_header
from muestra.models.runtime.base import Runtime

if TYPE_CHECKING:  # torch loads when a model does: checking a model path needs none of it
    import torch

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
RuntimeChoice = Literal["auto", "torch", "llamacpp"]
RUNTIMES = ("auto", "torch", "llamacpp")

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
    runtime: dict[str, Any] | None = None  # what computes: library, versions, threads, …

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (torch runtime); None on llama.cpp
    tokenizer: Any
    provenance: Provenance
    runtime: Runtime = None  # type: ignore[assignment]  # default: torch over `model`
    generation_config: Any = None  # a transformers GenerationConfig (default: the model's)

    def __post_init__(self) -> None:
        if self.runtime is None:
            from muestra.models.runtime.torch_runtime import TorchRuntime

            self.runtime = TorchRuntime(self.model)
        if self.generation_config is None and self.model is not None:
            self.generation_config = self.model.generation_config

    @property
    def eos_token_ids(self) -> list[int]:
        """Every EOS id of the generation config (falling back to the model config, or to
        the GGUF's end-of-generation tokens)."""
        source = getattr(self.generation_config, "eos_token_id", None)
        if source is None and self.model is not None:
            source = self.model.config.eos_token_id
        if source is None and hasattr(self.runtime, "eog_ids"):
            source = self.runtime.eog_ids()
        if source is None:
            return []
        return [int(source)] if isinstance(source, int) else [int(i) for i in source]

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer, which masks and biases must match (not len(tokenizer))."""
        return self.runtime.vocab_size

    @property
    def max_length(self) -> int | None:
        return self.runtime.max_length


# the mark of a folder a muestra training is still writing, or was killed while writing
PARTIAL_TRAINING = "muestra-train.partial"


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
        if path.is_dir() and (path / PARTIAL_TRAINING).exists():
            raise ModelLoadError(
                f"model {ref!r} is a training that did not finish (it holds "
                f"{PARTIAL_TRAINING}); delete it and train again"
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
        if _hub_offline():
            raise ModelNotFoundError(offline_hint(repo_id)) from None
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as err:
            raise ModelNotFoundError(offline_hint(repo_id)) from err
    path = Path(folder)
    commit = path.name if path.parent.name == "snapshots" else None
    return path, "hub", commit


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether a snapshot of `repo_id` is in the local cache (True for an invalid id, so
    that resolving it names the problem)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
        )
    except HFValidationError:
        return True
    except Exception:
        return False
    return True


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
    folder, source, _ = resolve_model(ref, revision, trust_remote_code=trust_remote_code)
    from transformers import AutoTokenizer  # after the path is checked: it loads torch

    gguf = find_gguf(folder) if source == "local" else None
    if gguf is None:
        check_model_code(ref, folder, trust_remote_code)
    try:
        if gguf is not None:
            return load_gguf_tokenizer(gguf)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        _raise_if_remote_code(ref, err)
        raise ModelNotFoundError(
            f"no usable tokenizer in {folder} ({_first_line(err)}). The folder needs "
            "tokenizer.json or the tokenizer files of its model."
        ) from err
    except OSError as err:
        raise ModelNotFoundError(
            f"no usable tokenizer in {folder} ({err}). The folder needs tokenizer.json or "
            "the tokenizer files of its model."
        ) from err


def resolve_device(device: Device) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device; use cpu")
    return torch.device(device)


def resolve_dtype(dtype: Dtype) -> torch.dtype | str:
    import torch

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
    runtime: RuntimeChoice = "auto",
    threads: int | None = None,
    batch_invariant: bool = True,
    thread_wait: str | None = None,
    kv_cache: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer on a runtime; see the module docstring for the
    rules. `threads`: the runtime's CPU threads (default: the cores, or OMP_NUM_THREADS);
    `batch_invariant`: llama.cpp's exact batching (`llamacpp_runtime.py`); `thread_wait`:
    how idle threads wait, sleep | spin (`runtime/threads.py`: set for the process, or
    refused once torch has fixed another); `kv_cache`: llama.cpp's KV cache type (f16 |
    q8_0; refused on torch, whose cache takes the model's dtype)."""
    from muestra.models.runtime.threads import apply_thread_wait

    apply_thread_wait(thread_wait, "thread_wait")  # before torch (imported next) fixes it
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if threads is not None:  # before anything is read
        check_threads(threads)
    hf_logging.disable_progress_bar()
    files = check_model(ref, revision, allow_pickle, trust_remote_code)
    choice = choose_runtime(ref, files, auto_runtime(runtime, dtype, device))
    if choice == "llamacpp":
        return _load_llamacpp(ref, files, dtype, device, threads, batch_invariant, kv_cache)
    if kv_cache is not None:
        raise InputError(
            f"kv_cache {kv_cache!r} sets llama.cpp's KV cache type; the torch runtime caches "
            "keys and values in the model's dtype: leave kv_cache out, or use --runtime "
            "llamacpp with a GGUF"
        )
    if not batch_invariant:
        raise InputError(
            "batch_invariant=false chooses llama.cpp's free batching; the torch runtime has no "
            "such switch: leave it on, or use --runtime llamacpp with a GGUF"
        )
    if threads is not None:
        import torch

        torch.set_num_threads(_positive_threads(threads))
    if files.gguf is not None and not files.weights_are_folder:
        model, tokenizer = load_gguf(files.gguf, resolve_dtype(dtype))
        model = model.to(resolve_device(device))
        return _loaded(ref, files.gguf, files.source, None, [files.gguf], model, tokenizer)
    folder = files.folder
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    target = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=resolve_dtype(dtype),
            use_safetensors=files.safetensors,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, RuntimeError, ImportError, SafetensorError) as err:
        if isinstance(err, ValueError):
            _raise_if_remote_code(ref, err)
        raise ModelLoadError(
            f"model {ref!r} did not load from {folder}: {_first_line(err)} "
            f"({type(err).__name__}). Its files may be damaged or incomplete: rebuild or "
            "download it again."
        ) from err
    model.to(target).eval()
    return _loaded(ref, folder, files.source, files.commit, files.weights, model, tokenizer)


def choose_runtime(ref: str, files: ModelFiles, runtime: str) -> Literal["torch", "llamacpp"]:
    """The runtime `runtime` resolves to for these files. "auto" follows the weights: a
    GGUF alone runs on llama.cpp when llama-cpp-python is installed; a folder with
    transformers weights runs on torch (a kit keeps its GGUF beside them: `--runtime
    llamacpp` runs that)."""
    from muestra.models.runtime import llamacpp_runtime

    if runtime not in RUNTIMES:
        raise InputError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    if runtime == "llamacpp":
        if files.gguf is None:
            raise InputError(
                f"--runtime llamacpp runs GGUF files, and model {ref!r} ({files.folder}) has "
                "none. Pass a .gguf file (or a folder holding one), convert the model with "
                "llama.cpp's convert_hf_to_gguf.py, or use --runtime torch."
            )
        llamacpp_runtime.llama_cpp_module()  # says how to install it when missing
        return "llamacpp"
    only_gguf = files.gguf is not None and not files.weights_are_folder
    return "llamacpp" if only_gguf and llamacpp_runtime.available() else "torch"


def auto_runtime(runtime: str, dtype: str, device: str) -> str:
    """ "auto" with a dtype or a GPU asked for means torch: only torch can honour them."""
    if runtime == "auto" and (dtype != "auto" or device == "cuda"):
        return "torch"
    return runtime


def _positive_threads(threads: int) -> int:
    return check_threads(threads)


def _load_llamacpp(
    ref: str,
    files: ModelFiles,
    dtype: str,
    device: str,
    threads: int | None,
    batch_invariant: bool,
    kv_cache: str | None = None,
) -> LoadedModel:
    from transformers import GenerationConfig

    from muestra.models.runtime.llamacpp_runtime import LlamaCppRuntime

    assert files.gguf is not None
    if dtype != "auto":
        raise InputError(
            f"dtype {dtype!r} applies to the torch runtime; llama.cpp computes with the GGUF's "
            "own (quantized) types. Leave dtype at auto, or use --runtime torch."
        )
    if device == "cuda":
        raise InputError(
            "device cuda: muestra's llama.cpp runtime computes on the CPU; use --runtime torch "
            "for a GPU"
        )
    gguf, folder = files.gguf, files.gguf.parent
    # the tokenizer first: reading it takes more memory for a moment than it keeps
    # (~0.3 GB for a 150k-token vocabulary), better spent before the weights and the cache
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(folder))
    else:
        tokenizer = load_gguf_tokenizer(gguf)
    try:
        runtime = LlamaCppRuntime(
            gguf,
            threads=_positive_threads(threads) if threads else None,
            exact=batch_invariant,
            kv_cache=kv_cache,
        )
    except ModelLoadError as err:
        architecture = gguf_architecture(gguf)  # InputError for a file that is no GGUF
        raise InputError(
            f"{gguf}: llama.cpp cannot load this GGUF (architecture {architecture!r}; its log "
            "above says why): use a complete GGUF of an architecture it supports, or "
            "--runtime torch"
        ) from err
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    else:
        generation = GenerationConfig(eos_token_id=runtime.eog_ids())
    provenance = Provenance(
        model_id=ref,
        path=str(gguf.resolve()),
        source=files.source,
        revision=files.commit,
        weights_sha256=weights_hash([gguf]),
        kit_preset=_kit_preset(folder),
        runtime=runtime.info(),
    )
    return LoadedModel(None, tokenizer, provenance, runtime, generation)


@dataclass(frozen=True)
class ModelFiles:
    """A model resolved to local files and checked, before anything is loaded. `gguf`:
    the GGUF file, when there is one (alone, or beside safetensors weights in a kit)."""

    folder: Path
    source: Literal["local", "hub"]
    commit: str | None
    gguf: Path | None
    weights: list[Path]
    safetensors: bool

    @property
    def weights_are_folder(self) -> bool:
        """Whether the folder has transformers weights of its own (not only a GGUF)."""
        return self.gguf is None or self.weights != [self.gguf]


def check_model(
    ref: str,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelFiles:
    """Resolve `ref` to local files and refuse, without loading anything, a model that is
    missing, has no weights, or would run pickle or remote code it was not allowed to."""
    folder, source, commit = resolve_model(ref, revision, allow_pickle, trust_remote_code)
    gguf = find_gguf(folder, beside_weights=True) if source == "local" else None
    if gguf is not None and (folder.is_file() or not _weight_files(folder)[0]):
        read_gguf_header(gguf)  # a damaged or crafted header is refused now, by name
        return ModelFiles(folder, source, commit, gguf, [gguf], safetensors=False)
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
    check_model_code(ref, folder, trust_remote_code)
    _check_model_type(ref, folder)
    return ModelFiles(folder, source, commit, gguf, safetensors or pickles, bool(safetensors))


def check_model_without_download(
    ref: str, revision: str | None = None, trust_remote_code: bool = False
) -> None:
    """`check_model` where it needs no download: a local model, a cached Hub snapshot, or
    any Hub id when HF_HUB_OFFLINE is set (refused unless cached). A Hub id that is neither
    cached nor offline passes; its files are checked once downloaded."""
    path = Path(ref).expanduser()
    if path.exists() or _looks_like_path(ref) or _hub_offline() or _in_hub_cache(ref, revision):
        check_model(ref, revision, trust_remote_code=trust_remote_code)


def check_model_code(ref: str, folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose config or tokenizer needs its own Python code (`auto_map`)
    unless remote code is trusted."""
    for name in ("config.json", "tokenizer_config.json"):
        if "auto_map" in _json_object(folder / name) and not trust_remote_code:
            raise UnsafeModelError(_remote_code_hint(ref, f"its {name} has an auto_map"))


def _check_model_type(ref: str, folder: Path) -> None:
    """Refuse a model type this transformers does not know and no code of its own adds."""
    from transformers import CONFIG_MAPPING

    config = _json_object(folder / "config.json")
    model_type = config.get("model_type")
    if (
        isinstance(model_type, str)
        and model_type not in CONFIG_MAPPING
        and "auto_map" not in config
    ):
        raise InputError(
            f"model {ref!r} has model_type {model_type!r}, which this transformers does not "
            "know and the model ships no code for (no auto_map in its config.json). Upgrade "
            "transformers, or use a model of a supported type."
        )


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when missing or unreadable (transformers names
    that problem when loading)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remote_code_hint(ref: str, why: str) -> str:
    return (
        f"model {ref!r} needs its own Python code to load ({why}); muestra does not run it "
        "unless told. Pass --trust-remote-code if you trust the source (in an experiment "
        "spec: trust_remote_code = true under [model])."
    )


def _raise_if_remote_code(ref: str, err: ValueError) -> None:
    if "trust_remote_code" in str(err):
        raise UnsafeModelError(_remote_code_hint(ref, "transformers asked for it")) from err


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _loaded(
    ref: str,
    path: Path,
    source: Literal["local", "hub"],
    commit: str | None,
    weights: list[Path],
    model: Any,
    tokenizer: Any,
) -> LoadedModel:
    from muestra.models.runtime.torch_runtime import TorchRuntime

    runtime = TorchRuntime(model)
    provenance = Provenance(
        model_id=ref,
        path=str(path.resolve()),
        source=source,
        revision=commit or getattr(model.config, "_commit_hash", None),
        weights_sha256=weights_hash(weights),
        kit_preset=_kit_preset(path) if path.is_dir() else None,
        runtime=runtime.info(),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, provenance=provenance, runtime=runtime)
