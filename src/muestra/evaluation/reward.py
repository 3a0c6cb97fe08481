"""Reward models: train one with TRL's `RewardTrainer` (Bradley–Terry loss on a
sequence-classification head over a base model), score texts with it, and add a reward to
every sample of an experiment.

A reward model is an ordinary transformers folder (`AutoModelForSequenceClassification`,
one label) with `muestra-train.json` beside its weights: the base model's provenance, the
pairs' hash and provenance, the hyper-parameters and the held-out pairwise accuracy
before and after training.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.errors import InputError
from muestra.evaluation.preferences import (
    Completion,
    PairSet,
    Text,
    pair_text,
)

TRAIN_RECORD = "muestra-train.json"


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


def cpu_arguments(scratch: str, seed: int, quiet: bool) -> dict[str, Any]:
    """TRL/transformers training arguments shared by every trainer here: on the CPU in
    fp32, seeded, nothing saved or reported but the final model."""
    return {
        "output_dir": scratch,
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

    from muestra import __version__
    from muestra.experiments.store import now

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
    import contextlib
    import sys

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = trainer.train()
    return result, time.perf_counter() - start


def save_trained(trainer: Any, tokenizer: Any, out: Path, scratch: str) -> None:
    """The trained model and its tokenizer in `out`, without the trainer's pickled
    arguments (muestra refuses pickle files in a model folder); the scratch folder of
    checkpoints and logs is removed."""
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)


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
    def load(cls, folder: Path) -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (folder / "config.json").is_file():
            raise InputError(f"no reward model at {folder}: train one with `muestra reward train`")
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype="float32")
        if model.config.num_labels != 1:
            raise InputError(
                f"{folder} is a classifier with {model.config.num_labels} labels; a reward "
                "model has one"
            )
        return cls(model, AutoTokenizer.from_pretrained(folder), folder)

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
    base: str, pairs: PairSet, out: Path, settings: TrainSettings, quiet: bool = False
) -> dict[str, Any]:
    """Train a reward model on `pairs` (minus a held-out part) and save it in `out`."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    folder = hf_folder(base)
    train, held = pairs.split(settings.eval_fraction, settings.seed)
    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, dtype="float32"
    )
    scorer = RewardModel(model, tokenizer)
    before = scorer.pairwise_accuracy(held)
    freeze_lower_layers(model, settings.train_layers)
    scratch = tempfile.mkdtemp(prefix="muestra-train-")
    config = RewardConfig(**cpu_arguments(scratch, settings.seed, quiet), **settings.trl(train))
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(train.records()),
        processing_class=tokenizer,
    )
    result, seconds = run_training(trainer)
    save_trained(trainer, tokenizer, out, scratch)
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
    write_record(out, "reward", base, pairs, hyperparameters=settings.record(), metrics=metrics)
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
    from muestra.experiments.store import latest_run

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
    ids = db.execute(
        """
        SELECT s.id, s.scores_json FROM samples s
        JOIN prompts p ON p.id = s.prompt_id
        JOIN models m ON m.id = s.model_id JOIN conditions c ON c.id = s.condition_id
        WHERE s.run_id = ? ORDER BY m.id, c.id, p.prompt_index, s.sample_index
        """,
        (run["id"],),
    ).fetchall()
    identity = reward.identity
    with db:
        for (sample_id, scores_json), value in zip(ids, values, strict=True):
            scores = json.loads(scores_json) if scores_json else {}
            scores.update({"reward": value, "reward_model": identity, "reward_of": completion})
            db.execute(
                "UPDATE samples SET scores_json = ? WHERE id = ?",
                (json.dumps(scores), sample_id),
            )
    return len(values)
