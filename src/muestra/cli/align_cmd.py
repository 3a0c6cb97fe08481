"""`muestra pairs`, `muestra reward train|score`, `muestra align dpo|rloo`: preference
pairs from a store, reward models, and alignment with TRL on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from muestra.cli.common import JsonOption, print_json, stderr, stdout
from muestra.errors import InputError

reward_app = typer.Typer(
    help="Train a reward model on preference pairs (TRL RewardTrainer) and score samples.",
    no_args_is_help=True,
)
align_app = typer.Typer(
    help="Align a model with TRL: DPO on preference pairs, or a few RLOO steps.",
    no_args_is_help=True,
)

COMPLETION_HELP = (
    "answer: the answer text alone; full: the reasoning, the text that closed it and the "
    "answer, after the prompt the model saw."
)


def register(app: typer.Typer) -> None:
    app.command("pairs")(pairs)
    app.add_typer(reward_app, name="reward")
    app.add_typer(align_app, name="align")


def _completion(value: str) -> Any:
    if value not in ("answer", "full"):
        raise InputError(f"--completion must be answer or full, got {value!r}")
    return value


def pairs(
    store: Path = typer.Argument(..., help="SQLite store written by `muestra run`."),
    chosen: str = typer.Option(
        ..., "--chosen", help="Rule of the preferred samples, e.g. 'gender == \"female\"'."
    ),
    rejected: str = typer.Option(
        ..., "--rejected", help="Rule of the rejected samples, e.g. 'gender == \"male\"'."
    ),
    out: Path = typer.Option(..., "--out", help="JSONL to write (its provenance beside it)."),
    run_id: int | None = typer.Option(None, "--run", help="Run id (default: the latest)."),
    completion: str = typer.Option("full", "--completion", help=COMPLETION_HELP),
    max_per_prompt: int = typer.Option(
        64,
        "--max-per-prompt",
        min=1,
        help="At most this many pairs per prompt × model × condition.",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Preference pairs from an experiment's own samples: every sample that matches
    --chosen with one that matches --rejected, of the same prompt, model and condition.

    Rules are pandas query expressions over the columns of `muestra export`: answer
    fields, `valid` (no error), `think_tokens`, `budget_hit`, `var_*`, and scores such as
    `reward`. Quote Python words with backticks: `class` == "Support".
    """
    from muestra.evaluation.preferences import PairSet, store_pairs
    from muestra.experiments.store import latest_model_ref, reading
    from muestra.models.loading import load_tokenizer

    PairSet.check_out(out)
    with reading(store) as db:
        tokenizer = None
        if completion == "full":
            ref = latest_model_ref(db, run_id)
            tokenizer = load_tokenizer(ref) if ref else None
        made = store_pairs(
            db,
            chosen,
            rejected,
            run_id=run_id,
            completion=_completion(completion),
            max_per_prompt=max_per_prompt,
            tokenizer=tokenizer,
        )
    meta_path = made.write(out)
    if as_json:
        print_json({"path": str(out), "pairs": len(made.pairs), **made.meta})
        return
    matched = made.meta["matched"]
    stdout.print(
        f"{len(made.pairs)} pairs from {made.meta['cells']} prompt cells "
        f"(chosen {matched['chosen']}, rejected {matched['rejected']} samples) → {out} "
        f"(provenance: {meta_path})"
    )


def _settings(**values: Any) -> Any:
    from muestra.evaluation.reward import TrainSettings

    return TrainSettings(**values)


def _checked_pairs(data: Path, base: str) -> Any:
    """The preference file and the base model checked (each refused by name) before TRL
    and torch are imported; then the pairs."""
    from muestra.evaluation.preferences import pair_rows, pair_set
    from muestra.evaluation.reward import hf_folder

    rows = pair_rows(data)
    hf_folder(base)
    return pair_set(rows, data)


@reward_app.command("train")
def reward_train(
    base: str = typer.Option(..., "--base", help="Base model: a transformers folder."),
    data: Path = typer.Option(..., "--data", help="Preference pairs (JSONL or JSON)."),
    out: Path = typer.Option(..., "--out", help="Folder for the reward model."),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01),
    lr: float = typer.Option(5e-5, "--lr", min=0.0),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_length: int = typer.Option(
        512, "--max-length", min=8, help="Pairs longer than this many tokens are dropped."
    ),
    eval_fraction: float = typer.Option(
        0.2, "--eval-fraction", min=0.0, max=0.9, help="Share of pairs held out."
    ),
    train_layers: int | None = typer.Option(
        None,
        "--train-layers",
        min=1,
        help="Train only the last N transformer blocks (and the head); the rest stays "
        "frozen, which makes a CPU step several times faster. Default: every weight.",
    ),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace what --out holds (default: it must be new or empty)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Train a reward model (a one-label sequence-classification head on the base model,
    Bradley–Terry loss, TRL's RewardTrainer) and report the pairwise accuracy on the
    held-out pairs before and after training."""
    from muestra.evaluation.reward import check_out, train_reward

    settings = _settings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        eval_fraction=eval_fraction,
        seed=seed,
        train_layers=train_layers,
    )
    check_out(out, overwrite)
    pairs = _checked_pairs(data, base)
    metrics = train_reward(
        base, pairs, out, settings, quiet=not stderr.is_terminal, overwrite=overwrite
    )
    if as_json:
        print_json(metrics)
        return

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    stdout.print(
        f"reward model → {out}: held-out pairwise accuracy "
        f"{pct(metrics['held_out_accuracy_before'])} before, "
        f"{pct(metrics['held_out_accuracy_after'])} after "
        f"({metrics['held_out_pairs']} held-out, {metrics['train_pairs']} training pairs, "
        f"{metrics['train_seconds']:.1f} s)"
    )


@reward_app.command("score")
def reward_score(
    store: Path = typer.Argument(..., help="SQLite store written by `muestra run`."),
    reward: Path = typer.Option(..., "--reward", help="Folder of a reward model."),
    run_id: int | None = typer.Option(None, "--run", help="Run id (default: the latest)."),
    completion: str = typer.Option("full", "--completion", help=COMPLETION_HELP),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
) -> None:
    """Add a reward to every sample of a run (kept in its scores, shown by `muestra
    analyze` and `muestra report`); scoring again replaces it."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from muestra.evaluation.reward import RewardModel, score_store
    from muestra.experiments.store import connect, count_samples

    if not store.is_file():
        raise InputError(f"store {store} does not exist; run `muestra run SPEC.toml --out {store}`")
    model = RewardModel.load(reward)
    db = connect(store)
    try:
        total = count_samples(db, run_id)
        start = time.perf_counter()
        with Progress(
            TextColumn("reward"),
            BarColumn(),
            MofNCompleteColumn(),
            console=stderr,
            disable=not stderr.is_terminal,
        ) as bar:
            handle = bar.add_task("reward", total=total)
            count = score_store(
                db,
                model,
                run_id,
                _completion(completion),
                batch_size,
                progress=lambda n: bar.advance(handle, n),
            )
        seconds = time.perf_counter() - start
    finally:
        db.close()
    stdout.print(
        f"{count} samples scored by {model.identity} in {seconds:.1f} s "
        f"({count / max(seconds, 1e-9):.1f} samples/s); see `muestra analyze {store}`"
    )


@align_app.command("dpo")
def align_dpo(
    base: str = typer.Option(..., "--base", help="Model to align: a transformers folder."),
    data: Path = typer.Option(..., "--data", help="Preference pairs (JSONL or JSON)."),
    out: Path = typer.Option(..., "--out", help="Folder for the aligned model."),
    beta: float = typer.Option(
        0.1, "--beta", min=0.0, help="DPO's β: higher stays closer to the base model."
    ),
    epochs: float = typer.Option(1.0, "--epochs", min=0.01),
    lr: float = typer.Option(5e-6, "--lr", min=0.0),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_length: int = typer.Option(1024, "--max-length", min=8),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", min=0.0, max=0.9),
    train_layers: int | None = typer.Option(
        None,
        "--train-layers",
        min=1,
        help="Train only the last N transformer blocks (and the head); the rest stays "
        "frozen, which makes a CPU step several times faster. Default: every weight.",
    ),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace what --out holds (default: it must be new or empty)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """DPO (TRL's DPOTrainer, sigmoid loss, the base model as frozen reference). The
    output is an ordinary model folder every muestra command loads, with its provenance
    (base weights hash, data hash, hyper-parameters) in muestra-train.json."""
    from muestra.evaluation.align import train_dpo
    from muestra.evaluation.reward import check_out

    settings = _settings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        eval_fraction=eval_fraction,
        seed=seed,
        beta=beta,
        train_layers=train_layers,
    )
    check_out(out, overwrite)
    pairs = _checked_pairs(data, base)
    metrics = train_dpo(
        base, pairs, out, settings, quiet=not stderr.is_terminal, overwrite=overwrite
    )
    if as_json:
        print_json(metrics)
        return
    before, after = metrics["before"]["train"], metrics["after"]["train"]
    stdout.print(
        f"aligned model → {out} ({metrics['train_seconds']:.1f} s): on the "
        f"{metrics['train_pairs']} training pairs, DPO loss {before['loss']:.3f} → "
        f"{after['loss']:.3f}, log p(chosen) − log p(rejected) {before['margin']:.2f} → "
        f"{after['margin']:.2f}"
    )
    if metrics["after"]["held_out"] is not None:
        hb, ha = metrics["before"]["held_out"], metrics["after"]["held_out"]
        stdout.print(
            f"held out ({metrics['held_out_pairs']} pairs): loss {hb['loss']:.3f} → "
            f"{ha['loss']:.3f}, margin {hb['margin']:.2f} → {ha['margin']:.2f}"
        )


@align_app.command("rloo")
def align_rloo(
    base: str = typer.Option(..., "--base", help="Policy to start from: a transformers folder."),
    reward: Path = typer.Option(..., "--reward", help="Folder of a reward model."),
    data: Path = typer.Option(
        ..., "--data", help="Preference pairs whose prompts are used (their answers are not)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the updated policy."),
    steps: int = typer.Option(4, "--steps", min=1),
    generations: int = typer.Option(4, "--generations", min=2, help="Completions per prompt."),
    prompts_per_step: int = typer.Option(
        1, "--prompts-per-step", min=1, help="Prompts a step (× --generations completions)."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    lr: float = typer.Option(1e-5, "--lr", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace what --out holds (default: it must be new or empty)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """A few online RL steps as seed 004 sketches with PPO: TRL has no PPOTrainer any more,
    so this is RLOO (policy gradient with a leave-one-out baseline) with the reward model
    as the reward. An illustration of the loop, not a training recipe."""
    from muestra.evaluation.align import rloo_steps
    from muestra.evaluation.reward import check_out, trained_folder

    check_out(out, overwrite)
    trained_folder(reward, "reward", "--reward")
    pairs = _checked_pairs(data, base)
    result = rloo_steps(
        base,
        reward,
        pairs,
        out,
        steps=steps,
        generations=generations,
        prompts_per_step=prompts_per_step,
        max_new_tokens=max_new_tokens,
        lr=lr,
        seed=seed,
        quiet=not stderr.is_terminal,
        overwrite=overwrite,
    )
    if as_json:
        print_json(result)
        return
    rewards = result["mean_reward_per_step"]
    stdout.print(
        f"policy → {out}: mean reward per step "
        + ", ".join(f"{r:.3f}" for r in rewards)
        + f" ({result['train_seconds']:.1f} s)"
    )
