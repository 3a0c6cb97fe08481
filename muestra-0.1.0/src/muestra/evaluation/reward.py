"""Reward models: train one with TRL's `RewardTrainer` (Bradley–Terry loss on a
sequence-classification head over a base model), score texts with it, and add a reward to
every sample of an experiment.

A reward model is an ordinary transformers folder (`AutoModelForSequenceClassification`,
one label) with `muestra-train.json` beside its weights: the base model's provenance, the
pairs' hash and provenance, the hyper-parameters and the held-out pairwise accuracy
before and after training.

Every training command writes its folder atomically (`training_output`): it trains in a
hidden scratch folder beside `--out` marked `muestra-train.partial`, writes the
provenance file last and renames the folder into place, so `--out` is either absent or
complete; a command that loads a trained folder (`trained_folder`) refuses one without
its provenance, and `load_model` refuses a folder that still carries the mark.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.errors import InputError, Interrupted
from muestra.evaluation.preferences import (
    Completion,
    PairSet,
    Text,
    pair_text,
)
from muestra.models.loading import PARTIAL_TRAINING

TRAIN_RECORD = "muestra-train.json"
PARTIAL_MARK = PARTIAL_TRAINING  # in a folder whose training has not finished
TRAINER_SCRATCH = "trainer-scratch"  # the trainer's own output_dir, inside the scratch


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an `--out` a training run would damage, before any work: a file, or a
    folder with something in it (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; a trained model is a folder: choose a new path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"--out {out} is a folder that is not empty; choose a new path, or pass "
            "--overwrite to replace what it holds"
        )
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a folder")


@contextlib.contextmanager
def training_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A scratch folder beside `out` to train into; renamed to `out` when the block ends
    with the provenance file written, removed when it fails or is interrupted (Ctrl-C is
    turned into `Interrupted`, which says so). A killed process leaves only the hidden
    scratch folder, marked partial, which no muestra command loads."""
    check_out(out, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    (scratch / PARTIAL_MARK).write_text(
        "muestra is training into this folder, or was stopped before it finished: it is "
        "not a model. Delete it.\n"
    )
    started = time.perf_counter()
    try:
        yield scratch
        if not (scratch / TRAIN_RECORD).is_file():
            raise RuntimeError(f"training finished without writing {TRAIN_RECORD}")
        shutil.rmtree(scratch / TRAINER_SCRATCH, ignore_errors=True)
        (scratch / PARTIAL_MARK).unlink()
        _move_into_place(scratch, out)
    except KeyboardInterrupt:
        shutil.rmtree(scratch, ignore_errors=True)
        raise Interrupted(
            f"interrupted after {time.perf_counter() - started:.0f} s: training stopped, "
            f"nothing was written to {out} and its scratch folder was removed"
        ) from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _move_into_place(scratch: Path, out: Path) -> None:
    """Rename `scratch` to `out`; an existing `out` (empty, or replaced by --overwrite)
    is moved aside first and removed after, so `out` is never half old, half new."""
    if not out.exists():
        os.replace(scratch, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
    os.replace(out, aside / "old")
    os.replace(scratch, out)
    shutil.rmtree(aside, ignore_errors=True)


def trained_folder(folder: Path, kind: str, flag: str) -> dict[str, Any]:
    """The provenance of a finished `muestra` training folder of `kind`, or an
    `InputError` naming the flag and saying why the folder cannot be used."""
    if not folder.is_dir():
        raise InputError(f"{flag} {folder} does not exist or is not a folder")
    if (folder / PARTIAL_MARK).exists():
        raise InputError(
            f"{flag} {folder} is a training that did not finish (it holds {PARTIAL_MARK}); "
            "delete it and train again"
        )
    record_path = folder / TRAIN_RECORD
    if not record_path.is_file():
        raise InputError(
            f"{flag} {folder} has no {TRAIN_RECORD}: it is not a finished `muestra {kind}` "
            "output (a training that was killed, or another program's folder); train one "
            f"with `muestra {'reward train' if kind == 'reward' else 'align ' + kind}`"
        )
    try:
        record = json.loads(record_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{flag} {record_path} is damaged ({err}); train again") from None
    if not isinstance(record, dict) or record.get("kind") != kind:
        found = record.get("kind") if isinstance(record, dict) else None
        raise InputError(
            f"{flag} {folder} was trained by `muestra` as {found!r}, not as a {kind!r} model"
        )
    return record


@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 4
    max_length: int = 512
    eval_fraction: float = 0.2
    seed: int = 0
    beta: float = 0.1  # DPO only
    train_layers: int | None = None  # None: every weight trains; N: the last N blocks only

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def trl(self, train: PairSet) -> dict[str, Any]:
        """These settings as TRL config arguments, for training on `train`."""
        return {
            "num_train_epochs": self.epochs,
            "learning_rate": self.lr,
            "per_device_train_batch_size": self.batch_size,
            "max_length": self.max_length,
            "logging_steps": max(1, len(train.pairs) // (4 * self.batch_size)),
        }


def cpu_arguments(scratch: Path, seed: int, quiet: bool) -> dict[str, Any]:
    """TRL/transformers training arguments shared by every trainer here: on the CPU in
    fp32, seeded, nothing saved or reported but the final model."""
    return {
        "output_dir": str(scratch / TRAINER_SCRATCH),
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,  # TRL defaults to bf16 autocast: slower on CPU, not the fp32 we measure
        _checkpointing_name(): False,  # TRL turns it on; memory is not the limit here
        "disable_tqdm": quiet,
        "dataloader_num_workers": 0,
    }


def _checkpointing_name() -> str:
    """transformers' name of the activation-checkpointing switch: `activation_checkpointing`
    (`gradient_checkpointing` is its deprecated alias since transformers 5.x)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def hf_folder(ref: str) -> Path:
    """The transformers folder of a model reference (training needs one, not a GGUF)."""
    return _files(ref).folder


def _files(ref: str) -> Any:
    from muestra.models.loading import check_model

    files = check_model(ref, None, False, False)
    if files.gguf is not None and list(files.weights) == [files.gguf]:  # a GGUF alone
        raise InputError(
            f"model {ref!r} is a GGUF file; training needs a transformers folder. Build one "
            "with `muestra kit build --preset smollm2-135m-instruct` (or save it with "
            "save_pretrained) and pass that folder."
        )
    return files


def base_provenance(ref: str) -> dict[str, Any]:
    from muestra.models.loading import weights_hash

    files = _files(ref)
    return {
        "model_id": ref,
        "path": str(files.folder.resolve()),
        "weights_sha256": weights_hash(files.weights),
    }


def write_record(out: Path, kind: str, base: str, pairs: PairSet, **extra: Any) -> None:
    import torch
    import transformers
    import trl

    from muestra.experiments.store import now
    from muestra.version import __version__

    record = {
        "kind": kind,
        "base": base_provenance(base),
        "data": {"sha256": pairs.sha256, "pairs": len(pairs.pairs), **pairs.meta},
        **extra,
        "versions": {
            "muestra": __version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "created_at": now(),
    }
    (out / TRAIN_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def freeze_lower_layers(model: Any, train_layers: int | None) -> None:
    """Train only the last `train_layers` transformer blocks, the final norm and a reward
    model's score head; the embeddings and the blocks below stay frozen, so the backward
    pass stops early (most of a training step's time on a CPU). None trains everything."""
    import torch

    if train_layers is None:
        return
    base = model.base_model
    blocks = getattr(base, "layers", None) or getattr(base, "h", None)
    if blocks is None:
        raise InputError(f"{type(model).__name__}: cannot find its transformer blocks")
    if not 1 <= train_layers <= len(blocks):
        raise InputError(
            f"--train-layers must be between 1 and the model's {len(blocks)} blocks, "
            f"got {train_layers}"
        )
    model.requires_grad_(False)
    for block in list(blocks)[len(blocks) - train_layers :]:
        block.requires_grad_(True)
    for name in ("norm", "ln_f"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            getattr(base, name).requires_grad_(True)
    score = getattr(model, "score", None)
    if score is not None:
        score.requires_grad_(True)


def run_training(trainer: Any) -> tuple[Any, float]:
    """`trainer.train()` with its log lines and progress on stderr (stdout stays for the
    caller's result, e.g. `--json`); returns TRL's result and the wall time."""
    import sys
    import warnings

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # TRL 1.16 reads transformers' deprecated `is_gradient_checkpointing` in its
        # trainers; muestra sets the current name (`_checkpointing_name`): not the user's
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        result = trainer.train()
    return result, time.perf_counter() - start


def save_trained(trainer: Any, tokenizer: Any, out: Path) -> None:
    """The trained model and its tokenizer in `out` (a `training_output` scratch folder),
    without the trainer's pickled arguments (muestra refuses pickle files in a model
    folder) nor its checkpoints and logs."""
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(out / TRAINER_SCRATCH, ignore_errors=True)


def load_reward_files(folder: Path, flag: str) -> tuple[Any, Any]:
    """The one-label classifier and tokenizer in `folder`, with what transformers says
    when they do not load turned into an `InputError` that names the folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / name).is_file() for name in tokenizer_files):
        raise InputError(
            f"{flag} {folder} does not load as a reward model (it has no tokenizer files: "
            f"none of {', '.join(tokenizer_files)}); train it again with `muestra reward train`"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{flag} {folder} does not load as a reward model ({reason[:300]}); train it "
            "again with `muestra reward train`"
        ) from None
    if model.config.num_labels != 1:
        raise InputError(
            f"{flag} {folder} is a classifier with {model.config.num_labels} labels; a reward "
            "model has one"
        )
    return model, tokenizer


class RewardModel:
    """A loaded reward model: `score` gives one number per (prompt, completion)."""

    def __init__(self, model: Any, tokenizer: Any, folder: Path | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.folder = folder
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id

    @classmethod
    def load(cls, folder: Path, flag: str = "--reward") -> RewardModel:
        """A reward model `muestra reward train` finished (see `trained_folder`); a folder
        whose files do not load is a one-line error naming it."""
        trained_folder(folder, "reward", flag)
        model, tokenizer = load_reward_files(folder, flag)
        return cls(model, tokenizer, folder)

    @property
    def identity(self) -> str:
        from muestra.models.loading import weights_hash

        if self.folder is None:
            return "in-memory"
        files = sorted(self.folder.glob("*.safetensors"))
        return f"{self.folder.name}@{weights_hash(files)[:12]}"

    def ids(self, text: Text) -> list[int]:
        """Token ids of one text exactly as TRL's RewardTrainer builds them (a chat
        through the template; a plain text with the EOS appended)."""
        from trl.data_utils import _tokenize

        if isinstance(text, str) and not text.endswith(self.tokenizer.eos_token):
            text = text + self.tokenizer.eos_token
        return list(_tokenize(self.tokenizer, text)["input_ids"])

    def score(self, texts: list[Text], batch_size: int = 8, progress: Any = None) -> list[float]:
        """One reward per text, in order; texts are batched by length (less padding)."""
        import torch

        encoded = [self.ids(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out: list[float] = [0.0] * len(texts)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [encoded[i] for i in chunk]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for i, value in zip(chunk, logits[:, 0].tolist(), strict=True):
                out[i] = float(value)
            if progress is not None:
                progress(len(rows))
        return out

    def pairwise_accuracy(self, pairs: PairSet) -> float | None:
        if not pairs.pairs:
            return None
        chosen = self.score([pair_text(p.prompt, p.chosen) for p in pairs.pairs])
        rejected = self.score([pair_text(p.prompt, p.rejected) for p in pairs.pairs])
        wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        return wins / len(pairs.pairs)


def train_reward(
    base: str,
    pairs: PairSet,
    out: Path,
    settings: TrainSettings,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a reward model on `pairs` (minus a held-out part) and save it in `out`
    (atomically: see `training_output`)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    folder = hf_folder(base)
    train, held = pairs.split(settings.eval_fraction, settings.seed)
    with training_output(out, overwrite) as work:
        set_seed(settings.seed)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype="float32"
        )
        scorer = RewardModel(model, tokenizer)
        before = scorer.pairwise_accuracy(held)
        freeze_lower_layers(model, settings.train_layers)
        config = RewardConfig(**cpu_arguments(work, settings.seed, quiet), **settings.trl(train))
        trainer = RewardTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(train.records()),
            processing_class=tokenizer,
        )
        result, seconds = run_training(trainer)
        save_trained(trainer, tokenizer, work)
        trained = RewardModel(trainer.model, tokenizer)
        metrics = {
            "train_pairs": len(train.pairs),
            "held_out_pairs": len(held.pairs),
            "held_out_accuracy_before": before,
            "held_out_accuracy_after": trained.pairwise_accuracy(held),
            "train_accuracy_after": trained.pairwise_accuracy(train),
            "train_loss": float(result.training_loss),
            "train_seconds": seconds,
        }
        write_record(
            work, "reward", base, pairs, hyperparameters=settings.record(), metrics=metrics
        )
    return metrics


# --- a reward for every sample of a run ---------------------------------------------------


def score_store(
    db: Any,
    reward: RewardModel,
    run_id: int | None = None,
    completion: Completion = "full",
    batch_size: int = 8,
    progress: Any = None,
) -> int:
    """Score every sample of a run (default: the latest) and store `reward` (and the
    reward model's identity) in its scores. Returns the number of samples scored."""
    from muestra.evaluation.preferences import run_prompts, sample_text
    from muestra.experiments.results import samples_frame
    from muestra.experiments.store import latest_run, merge_scores, sample_rows

    run = dict(latest_run(db)) if run_id is None else {"id": run_id}
    frame = samples_frame(db, int(run["id"]))
    if frame.empty:
        raise InputError(f"run {run['id']} has no samples to score")
    messages, formats = run_prompts(db, int(run["id"]), completion, reward.tokenizer)
    texts = [
        pair_text(*sample_text(row, messages, formats.get(row["condition"])))
        for _, row in frame.iterrows()
    ]
    values = reward.score(texts, batch_size, progress)
    ids = [row["id"] for row in sample_rows(db, int(run["id"]))]  # the frame's order
    identity = reward.identity
    merge_scores(
        db,
        int(run["id"]),
        {
            sample_id: {"reward": value, "reward_model": identity, "reward_of": completion}
            for sample_id, value in zip(ids, values, strict=True)
        },
    )
    return len(values)
