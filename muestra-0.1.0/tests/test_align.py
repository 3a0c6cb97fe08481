"""Preference pairs, reward models and DPO with TRL, on the tiny kit: what a user runs
(`muestra pairs`, `muestra reward train|score`, `muestra align dpo`) and the oracles of
the issue — a planted signal is learned, scores equal a direct forward of the saved
model, DPO lowers its loss and widens the margin, the aligned folder decodes like HF."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from muestra.evaluation.preferences import (
    Pair,
    PairSet,
    PreferenceDataError,
    pair_text,
    read_pairs,
    store_pairs,
)
from muestra.experiments.store import connect, reading
from test_experiments import write_spec

SHIPPED = Path(__file__).parents[1] / "src/muestra/evaluation/data/preferences-helpful.jsonl"
WORDS = ["river", "table", "cloud", "stone", "window", "garden", "paper", "lamp", "coat", "road"]


def keyword_pairs(n: int, seed: int = 0) -> PairSet:
    """Pairs whose only signal is a planted word: the chosen text ends in "banana", the
    rejected one in another word, the rest is the same sentence."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(5))
        prompt = [{"role": "user", "content": f"Say something ({i})."}]
        pairs.append(
            Pair(
                prompt,
                [{"role": "assistant", "content": f"{words} banana"}],
                [{"role": "assistant", "content": f"{words} {rng.choice(WORDS)}"}],
            )
        )
    return PairSet(pairs, {"source": "planted keyword"})


# --- preference files -----------------------------------------------------------------


def test_read_pairs_explicit_conversational_and_implicit(tmp_path):
    shipped = read_pairs(SHIPPED)
    assert len(shipped.pairs) == 40
    assert shipped.pairs[0].prompt == [{"role": "user", "content": "How do I boil an egg?"}]
    assert shipped.pairs[0].chosen[0]["role"] == "assistant"

    hh = tmp_path / "hh.jsonl"  # Anthropic hh-rlhf's layout: the prompt is the shared start
    hh.write_text(
        json.dumps(
            {
                "chosen": "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, it is.",
                "rejected": "\n\nHuman: Is the sky blue?\n\nAssistant: No idea.",
            }
        )
        + "\n"
    )
    (pair,) = read_pairs(hh).pairs
    assert pair.prompt == "\n\nHuman: Is the sky blue?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" Yes, it is.", " No idea.")
    assert pair_text(pair.prompt, pair.chosen).endswith("Assistant: Yes, it is.")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"chosen": "a"}', "line 2: field 'rejected' must be"),
        ('{"chosen": "a", "rejected": "a"}', "line 2: 'chosen' and 'rejected' are the same"),
        ('{"chosen": "a", "rejected": [{"role": "user", "content": "b"}]}', "must both be texts"),
        ("[1, 2", "line 2: not valid JSON"),
    ],
)
def test_bad_preference_files_name_line_and_field(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"chosen": "x", "rejected": "y"}\n' + line + "\n")
    with pytest.raises(PreferenceDataError, match=message) as err:
        read_pairs(path)
    assert str(path) in str(err.value)


# --- pairs from a store ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_store(tiny_kit, tmp_path_factory):
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("pairs")
    spec = write_spec(folder, tiny_kit, samples=8)
    store = folder / "s.db"
    result = run_cli("run", str(spec), "--out", str(store))
    assert result.code == 0, result.stderr
    return store


def test_pairs_from_a_store_follow_the_rules(tiny_store, tiny_kit, tmp_path, cli):
    from muestra.models.loading import load_tokenizer

    with reading(tiny_store) as db:
        answers = db.execute(
            "SELECT p.prompt_key, s.answer_json, s.reasoning, s.answer_text FROM samples s "
            "JOIN prompts p ON p.id = s.prompt_id"
        ).fetchall()
        made = store_pairs(
            db,
            'sexo == "femenino"',
            'sexo == "masculino"',
            completion="full",
            tokenizer=load_tokenizer(str(tiny_kit)),
            max_per_prompt=5,
        )
        messages = {
            k: json.loads(m) for k, m in db.execute("SELECT prompt_key, messages_json FROM prompts")
        }
    by_prompt: dict[str, dict[str, set[str]]] = {}
    for key, answer, reasoning, text in answers:
        sexo = json.loads(answer)["sexo"]
        full = f"<think>\n{reasoning}\n</think>\n\n{text}"
        by_prompt.setdefault(key, {}).setdefault(sexo, set()).add(full)
    expected_cells = [k for k, v in by_prompt.items() if len(v) == 2]
    assert made.meta["cells"] == len(expected_cells) > 0
    for pair in made.pairs:
        key = next(k for k, m in messages.items() if m == pair.prompt)  # the stored prompt
        assert pair.chosen[0]["content"] in by_prompt[key]["femenino"]
        assert pair.rejected[0]["content"] in by_prompt[key]["masculino"]
    per_cell = {
        k: min(5, len(by_prompt[k]["femenino"]) * len(by_prompt[k]["masculino"]))
        for k in expected_cells
    }
    assert len(made.pairs) == sum(per_cell.values())

    out = tmp_path / "pairs.jsonl"
    result = cli(
        "pairs",
        str(tiny_store),
        "--chosen",
        'sexo == "femenino"',
        "--rejected",
        'sexo != "femenino"',
        "--completion",
        "answer",
        "--out",
        str(out),
        "--json",
    )
    assert result.code == 0, result.stderr
    meta = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())
    assert meta["chosen_rule"] == 'sexo == "femenino"' and meta["built_from"]["run_id"] == 1
    again = read_pairs(out)
    assert again.sha256 == meta["sha256"] and again.meta["completion"] == "answer"
    assert all('"femenino"' in p.chosen[0]["content"] for p in again.pairs)


def test_pair_rules_that_overlap_or_do_not_parse_are_refused(tiny_store, cli, tmp_path):
    result = cli(
        "pairs",
        str(tiny_store),
        "--chosen",
        "valid",
        "--rejected",
        'sexo == "masculino"',
        "--out",
        str(tmp_path / "p.jsonl"),
    )
    assert result.code == 2 and "match both rules" in result.stderr
    result = cli(
        "pairs",
        str(tiny_store),
        "--chosen",
        "sexoo == 1",
        "--rejected",
        "valid",
        "--out",
        str(tmp_path / "p.jsonl"),
    )
    assert (
        result.code == 2 and "sexoo" in result.stderr and "Columns: nombre, sexo" in result.stderr
    )


# --- reward models --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_dir(tiny_kit, tmp_path_factory):
    from muestra.evaluation.reward import TrainSettings, train_reward

    out = tmp_path_factory.mktemp("reward")
    metrics = train_reward(
        str(tiny_kit),
        keyword_pairs(48),
        out,
        TrainSettings(epochs=4, lr=2e-3, batch_size=8, eval_fraction=0.25, seed=0),
        quiet=True,
    )
    return out, metrics


def test_reward_training_learns_a_planted_keyword(reward_dir):
    out, metrics = reward_dir
    assert metrics["held_out_pairs"] == 12 and metrics["train_pairs"] == 36
    assert metrics["held_out_accuracy_before"] <= 0.75  # a random head does not know it
    assert metrics["held_out_accuracy_after"] >= 0.9
    record = json.loads((out / "muestra-train.json").read_text())
    assert record["kind"] == "reward" and record["data"]["pairs"] == 48
    assert record["hyperparameters"]["lr"] == 2e-3 and len(record["base"]["weights_sha256"]) == 64
    assert not (out / "training_args.bin").exists()


def test_reward_scores_equal_a_direct_forward_of_the_saved_model(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from muestra.evaluation.reward import RewardModel

    out, _ = reward_dir
    reward = RewardModel.load(out)
    texts = [pair_text(p.prompt, p.chosen) for p in keyword_pairs(5, seed=7).pairs]
    scores = reward.score(texts, batch_size=3)
    assert scores == reward.score(texts, batch_size=3)  # deterministic
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text, score in zip(texts, scores, strict=True):
        ids = tokenizer.apply_chat_template(text, tokenize=True, return_dict=True)["input_ids"]
        with torch.inference_mode():
            direct = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(direct, abs=1e-4)


def test_reward_score_adds_a_reward_to_every_sample(reward_dir, tiny_store, tmp_path, cli):
    import sqlite3

    from muestra.evaluation.reward import RewardModel

    out, _ = reward_dir
    store = tmp_path / "s.db"  # a copy (the store is in WAL mode: copy it through sqlite)
    with sqlite3.connect(tiny_store) as source, sqlite3.connect(store) as copy:
        source.backup(copy)
    result = cli("reward", "score", str(store), "--reward", str(out), "--completion", "answer")
    assert result.code == 0, result.stderr
    assert "16 samples scored" in result.stdout
    db = connect(store)
    rows = db.execute(
        "SELECT p.messages_json, s.answer_text, s.scores_json FROM samples s "
        "JOIN prompts p ON p.id = s.prompt_id"
    ).fetchall()
    db.close()
    reward = RewardModel.load(out)
    for messages, text, scores in rows[:4]:
        conversation = pair_text(json.loads(messages), [{"role": "assistant", "content": text}])
        assert json.loads(scores)["reward"] == pytest.approx(
            reward.score([conversation])[0], abs=1e-5
        )
    result = cli("analyze", str(store), "--json")
    rewards = result.json()["rewards"]
    assert {r["prompt"] for r in rewards["cells"]} == {"a", "b"}
    assert all(r["n"] == 8 and r["low"] <= r["mean"] <= r["high"] for r in rewards["cells"])
    report = tmp_path / "r.html"
    assert cli("report", str(store), "-o", str(report)).code == 0
    assert "<h2>Rewards</h2>" in report.read_text()


# --- DPO ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tiny_kit, tmp_path_factory):
    from muestra.evaluation.align import train_dpo
    from muestra.evaluation.reward import TrainSettings

    out = tmp_path_factory.mktemp("dpo")
    pairs = PairSet(read_pairs(SHIPPED).pairs[:8], {"source": str(SHIPPED)})
    settings = TrainSettings(epochs=1, lr=2e-3, batch_size=4, eval_fraction=0.0, beta=0.1)
    return out, train_dpo(str(tiny_kit), pairs, out, settings, quiet=True)


def test_dpo_lowers_its_loss_and_widens_the_margin(dpo_run):
    out, metrics = dpo_run
    before, after = metrics["before"]["train"], metrics["after"]["train"]
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert after["loss"] < before["loss"] - 0.05
    assert after["margin"] > before["margin"]
    record = json.loads((out / "muestra-train.json").read_text())
    assert record["kind"] == "dpo" and record["hyperparameters"]["beta"] == 0.1
    assert record["data"]["pairs"] == 8


def test_the_aligned_folder_decodes_like_hf_generate(dpo_run, tiny_kit):
    from muestra.answers.generation import TextGenerator
    from muestra.engine import GenerationRequest, SamplingParams
    from muestra.models.loading import load_model

    out, _ = dpo_run
    loaded = load_model(str(out), dtype="float32")
    base = load_model(str(tiny_kit), dtype="float32")
    assert not torch.equal(
        loaded.model.get_input_embeddings().weight, base.model.get_input_embeddings().weight
    )
    generator = TextGenerator(loaded)
    prompt = generator.encode_messages([{"role": "user", "content": "How do I boil an egg?"}])
    request = GenerationRequest(
        prompt, n=1, params=SamplingParams(temperature=0), max_new_tokens=16, seed=0
    )
    ours = generator.engine.generate([request])[0][0].token_ids
    expected = loaded.model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=loaded.eos_token_ids,
    )[0, len(prompt) :].tolist()
    assert ours == expected


def test_rloo_steps_run_against_the_reward_model(reward_dir, tiny_kit, tmp_path, cli):
    """Seed 004's online step (RLOO, since TRL has no PPOTrainer): it runs, logs a mean
    reward per step and saves a policy that differs from the base and loads."""
    from muestra.models.loading import load_model

    out_rm, _ = reward_dir
    data = tmp_path / "pairs.jsonl"
    keyword_pairs(4).write(data)
    result = cli(
        "align", "rloo", "--base", str(tiny_kit), "--reward", str(out_rm), "--data", str(data),
        "--out", str(tmp_path / "policy"), "--steps", "2", "--generations", "2",
        "--prompts-per-step", "2", "--max-new-tokens", "4", "--lr", "1e-3", "--json",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    metrics = result.json()
    assert len(metrics["mean_reward_per_step"]) == 2 and metrics["prompts"] == 4
    policy = load_model(str(tmp_path / "policy"), dtype="float32").model
    base = load_model(str(tiny_kit), dtype="float32").model
    assert any(
        not torch.equal(a, b) for a, b in zip(policy.parameters(), base.parameters(), strict=True)
    )
    record = json.loads((tmp_path / "policy/muestra-train.json").read_text())
    assert record["kind"] == "rloo" and record["hyperparameters"]["steps"] == 2
    assert record["hyperparameters"]["prompts_per_step"] == 2


def test_training_commands_refuse_bad_inputs_by_name(tiny_kit, tmp_path, cli):
    result = cli(
        "align", "dpo", "--base", str(tiny_kit), "--data", str(tmp_path / "none.jsonl"),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.code == 2 and "no preference file at" in result.stderr
    result = cli(
        "reward", "train", "--base", str(tmp_path / "nomodel"), "--data", str(SHIPPED),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.code == 2 and "no model folder" in result.stderr
    result = cli("reward", "score", str(tmp_path / "s.db"), "--reward", str(tmp_path))
    assert result.code == 2 and "does not exist" in result.stderr


def test_train_layers_freezes_everything_below_the_last_blocks(tiny_kit):
    from transformers import AutoModelForSequenceClassification

    from muestra.errors import InputError
    from muestra.evaluation.reward import freeze_lower_layers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_kit, num_labels=1)
    freeze_lower_layers(model, 1)
    trainable = {
        n.split(".")[0] + "." + n.split(".")[1]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"model.layers", "model.norm", "score.weight"}
    assert all(not p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    assert not model.model.embed_tokens.weight.requires_grad
    with pytest.raises(InputError, match="between 1 and the model's 2 blocks"):
        freeze_lower_layers(model, 3)


def test_training_takes_a_kit_folder_with_its_gguf_beside(smol_kit):
    """The real kit keeps its GGUF beside the safetensors (for llama.cpp): training reads
    the folder's transformers weights; a GGUF alone is refused, naming what to pass."""
    from muestra.errors import InputError
    from muestra.evaluation.reward import hf_folder

    assert hf_folder(str(smol_kit)) == smol_kit
    gguf = next(smol_kit.glob("*.gguf"))
    with pytest.raises(InputError, match="training needs a transformers folder"):
        hf_folder(str(gguf))
