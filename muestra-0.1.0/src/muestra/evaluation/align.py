"""Alignment steps on a real model with TRL: DPO on preference pairs, and a short online
RL illustration (RLOO) scored by a trained reward model.

Both write an ordinary model folder (weights, tokenizer, chat template, generation
config) that every muestra command loads, with `muestra-train.json` beside it: the base
model's weights hash, the data's hash and provenance, the hyper-parameters and what was
measured before and after.

Seed 004 sketches a PPO step. TRL removed `PPOTrainer` (it was moved to `trl.experimental`
and then dropped; TRL 1.16 has none), so the online step here is TRL's `RLOOTrainer`
(REINFORCE Leave-One-Out: PPO's policy-gradient update with a baseline from the other
completions of the same prompt instead of a value model), which takes a reward model as
its reward function. It is an illustration, not a recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muestra.evaluation.preferences import PairSet, Text
from muestra.evaluation.reward import (
    TrainSettings,
    cpu_arguments,
    freeze_lower_layers,
    hf_folder,
    load_reward_files,
    run_training,
    save_trained,
    trained_folder,
    training_output,
    write_record,
)


@dataclass(frozen=True)
class Margins:
    """Log-probabilities of the pairs under a policy and the reference (the base model)."""

    policy_chosen: list[float]
    policy_rejected: list[float]
    ref_chosen: list[float]
    ref_rejected: list[float]

    def loss(self, beta: float) -> float:
        """The mean sigmoid DPO loss, -log σ(β((πc − rc) − (πr − rr)))."""
        total = 0.0
        for pc, pr, rc, rr in zip(
            self.policy_chosen,
            self.policy_rejected,
            self.ref_chosen,
            self.ref_rejected,
            strict=True,
        ):
            z = beta * ((pc - rc) - (pr - rr))
            total += math.log1p(math.exp(-z)) if z > -30 else -z
        return total / len(self.policy_chosen)

    @property
    def margin(self) -> float:
        """Mean log p(chosen) − log p(rejected) under the policy."""
        diffs = [c - r for c, r in zip(self.policy_chosen, self.policy_rejected, strict=True)]
        return sum(diffs) / len(diffs)


def completion_logp(model: Any, tokenizer: Any, prompt: Text, completion: Text) -> float:
    """log p(completion | prompt): the completion's tokens after the prompt as the chat
    template renders it (generation prompt included), summed, from one forward pass."""
    import torch

    if isinstance(prompt, list):
        completion = (
            completion
            if isinstance(completion, list)
            else [{"role": "assistant", "content": completion}]
        )
        head = tokenizer.apply_chat_template(
            prompt, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(
            [*prompt, *completion], tokenize=True, return_dict=True
        )["input_ids"]
    else:
        head = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    start = 0
    while start < min(len(head), len(full)) and head[start] == full[start]:
        start += 1
    ids = torch.tensor([list(full)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    picked = logps[torch.arange(len(targets)), targets]
    return float(picked[max(start - 1, 0) :].sum())


def pair_margins(policy: Any, reference: Any, tokenizer: Any, pairs: PairSet) -> Margins:
    def logps(model: Any, side: str) -> list[float]:
        return [completion_logp(model, tokenizer, p.prompt, getattr(p, side)) for p in pairs.pairs]

    return Margins(
        logps(policy, "chosen"),
        logps(policy, "rejected"),
        logps(reference, "chosen"),
        logps(reference, "rejected"),
    )


def train_dpo(
    base: str,
    pairs: PairSet,
    out: Path,
    settings: TrainSettings,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """DPO (sigmoid loss) of `base` on `pairs`; the aligned model is saved in `out`.
    The reference is the base model, frozen. Metrics: the DPO loss and the chosen −
    rejected log-probability margin on the training and held-out pairs, before and after,
    measured by plain forward passes (not TRL's running averages)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    folder = hf_folder(base)
    train, held = pairs.split(settings.eval_fraction, settings.seed)
    with training_output(out, overwrite) as work:
        set_seed(settings.seed)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        freeze_lower_layers(model, settings.train_layers)
        before = {
            "train": pair_margins(model.eval(), reference, tokenizer, train),
            "held_out": pair_margins(model, reference, tokenizer, held) if held.pairs else None,
        }
        config = DPOConfig(
            **cpu_arguments(work, settings.seed, quiet), **settings.trl(train), beta=settings.beta
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=config,
            train_dataset=Dataset.from_list(train.records()),
            processing_class=tokenizer,
        )
        result, seconds = run_training(trainer)
        policy = trainer.model.eval()
        policy.generation_config = model.generation_config
        save_trained(trainer, tokenizer, work)
        after = {
            "train": pair_margins(policy, reference, tokenizer, train),
            "held_out": pair_margins(policy, reference, tokenizer, held) if held.pairs else None,
        }

        def summary(m: Margins | None) -> dict[str, float] | None:
            return None if m is None else {"loss": m.loss(settings.beta), "margin": m.margin}

        metrics = {
            "train_pairs": len(train.pairs),
            "held_out_pairs": len(held.pairs),
            "before": {k: summary(v) for k, v in before.items()},
            "after": {k: summary(v) for k, v in after.items()},
            "trl_train_loss": float(result.training_loss),
            "train_seconds": seconds,
        }
        write_record(work, "dpo", base, pairs, hyperparameters=settings.record(), metrics=metrics)
    return metrics


def rloo_steps(
    base: str,
    reward_dir: Path,
    pairs: PairSet,
    out: Path,
    *,
    steps: int = 4,
    generations: int = 4,
    prompts_per_step: int = 1,
    max_new_tokens: int = 32,
    lr: float = 1e-5,
    seed: int = 0,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A few RLOO steps of `base` against the reward model in `reward_dir`, on the
    distinct prompts of `pairs` (their completions are not used), `prompts_per_step`
    prompts × `generations` completions a step (one prompt a step makes each step's mean
    reward that prompt's: noise). Returns the mean reward of each step's completions as
    TRL logs it, and saves the policy in `out`."""
    import json

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import RLOOConfig, RLOOTrainer

    prompts = list({json.dumps(p.prompt, sort_keys=True): p.prompt for p in pairs.pairs}.values())
    folder = hf_folder(base)
    trained_folder(reward_dir, "reward", "--reward")
    with training_output(out, overwrite) as work:
        set_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
        reward_model, reward_tokenizer = load_reward_files(reward_dir, "--reward")
        if reward_tokenizer.pad_token is None:
            reward_tokenizer.pad_token = reward_tokenizer.eos_token
        reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
        config = RLOOConfig(
            **cpu_arguments(work, seed, quiet),
            max_steps=steps,
            learning_rate=lr,
            per_device_train_batch_size=generations * prompts_per_step,
            num_generations=generations,
            max_completion_length=max_new_tokens,
            temperature=1.0,
            logging_steps=1,
        )
        trainer = RLOOTrainer(
            model=policy,
            reward_funcs=reward_model,
            reward_processing_classes=reward_tokenizer,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
        )
        _, seconds = run_training(trainer)
        rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
        save_trained(trainer, tokenizer, work)
        metrics = {
            "mean_reward_per_step": rewards,
            "prompts": len(prompts),
            "train_seconds": seconds,
        }
        settings = {
            "steps": steps,
            "generations": generations,
            "prompts_per_step": prompts_per_step,
            "max_new_tokens": max_new_tokens,
            "lr": lr,
            "seed": seed,
            "reward_model": str(reward_dir),
        }
        write_record(work, "rloo", base, pairs, hyperparameters=settings, metrics=metrics)
    return metrics
