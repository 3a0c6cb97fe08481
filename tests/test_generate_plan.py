"""`muestra generate`'s flag table, walked: every (flag, mode) pair is applied or refused.

For each mode and each flag, the flag is given a value other than its default: either the
plan keeps it (and the mode's runner reads it: `test_every_mode_reads_every_setting_it_keeps`)
or the command refuses it by name before the model loads.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import typer

from muestra.cli import generate_cmd
from muestra.cli.app import app
from muestra.cli.generate_plan import APPLIES, MODES, flag, make_plan, mode_of
from muestra.errors import InputError

COMMAND = typer.main.get_command(app).commands["generate"]  # type: ignore[attr-defined]
DEFAULTS = {param.name: param.default for param in COMMAND.params}

BASES: dict[str, dict[str, Any]] = {
    "sample": {},
    "lookup": {"prompt_lookup": 4, "temperature": 0.0},
    "speculative": {"draft_model": "layers:1"},
    "beams": {"num_beams": 2},
    "beam-answer": {"num_beams": 2, "choice": "a,b"},
    "think": {"think_budget": 4, "choice": "a,b"},
    "think+answer-beams": {"think_budget": 4, "choice": "a,b", "num_beams": 2},
    "think-beams": {"think_budget": 4, "choice": "a,b", "think_num_beams": 2},
    "think-beams+answer-beams": {
        "think_budget": 4,
        "choice": "a,b",
        "think_num_beams": 2,
        "num_beams": 2,
    },
}

OTHER: dict[str, Any] = {  # a value other than the default, valid on its own
    "model": "another",
    "prompt": "Otra",
    "messages": "messages.json",
    "raw": True,
    "enable_thinking": False,
    "n": 2,
    "seed": 3,
    "temperature": 0.5,
    "top_k": 5,
    "top_p": 0.9,
    "min_p": 0.1,
    "typical_p": 0.5,
    "repetition_penalty": 1.3,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "dola_layers": "low",
    "stop": ("x",),
    "logprobs": 2,
    "stream": True,
    "max_new_tokens": 5,
    "ignore_eos": True,
    "max_batch": 8,
    "think_budget": 8,
    "think_mode": "text",
    "close_text": "Answer:",
    "think_temperature": 0.5,
    "think_top_p": 0.9,
    "think_top_k": 5,
    "think_min_p": 0.1,
    "think_typical_p": 0.5,
    "think_dola_layers": "high",
    "think_num_beams": 2,
    "answer_temperature": 0.5,
    "answer_top_p": 0.9,
    "answer_top_k": 5,
    "answer_min_p": 0.1,
    "answer_typical_p": 0.5,
    "answer_dola_layers": "2,4",
    "answer_max_tokens": 7,
    "schema": "answer.json",
    "regex": "a|b",
    "choice": "c,d",
    "grammar": "answer.ebnf",
    "field_probs": False,
    "num_beams": 2,
    "length_penalty": 0.5,
    "early_stopping": "true",
    "prompt_lookup": 3,
    "draft_model": "layers:2",
    "num_speculative_tokens": 2,
    "dtype": "float32",
    "device": "cpu",
    "allow_pickle": True,
    "trust_remote_code": True,
    "runtime": "torch",
    "threads": 2,
    "thread_wait": "spin",
    "batch_invariant": False,
    "kv_cache": "q8_0",
}
# flags that choose the mode: given in another mode, they may move the plan to theirs
SELECTORS = {"think_budget", "schema", "regex", "choice", "grammar", "num_beams",
             "think_num_beams", "draft_model", "prompt_lookup"}  # fmt: skip
# (mode, flag) pairs whose value above breaks a rule between flags, refused for that reason
VALUE_RULES = {
    ("lookup", "n"): "is greedy",
    ("lookup", "temperature"): "add --temperature 0",
    ("sample", "stream"): None,  # stream with n = 1: fine
    **{(mode, "messages"): "exactly one of" for mode in MODES},  # the base gives --prompt
}


def values(mode: str, **changes: Any) -> dict[str, Any]:
    return {**DEFAULTS, "model": "m", "prompt": "Hola", **BASES[mode], **changes}


def moved(given: dict[str, Any], mode: str) -> bool:
    try:
        return mode_of(given) != mode
    except InputError:
        return False


def test_the_table_and_the_command_name_the_same_flags():
    assert set(APPLIES) == set(DEFAULTS)
    assert set(OTHER) == set(DEFAULTS)
    assert all(OTHER[name] != DEFAULTS[name] for name in OTHER)
    for mode in MODES:
        assert make_plan(values(mode), DEFAULTS).mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_every_flag_is_applied_or_refused_by_name(mode):
    checked = 0
    for name, other in OTHER.items():
        rule = VALUE_RULES.get((mode, name))
        try:
            plan = make_plan(values(mode, **{name: other}), DEFAULTS)
        except InputError as error:
            message = str(error)
            if rule is not None:
                assert rule in message, (mode, name, message)
            elif mode in APPLIES[name]:
                pytest.fail(f"{flag(name)} applies in {mode} but was refused: {message}")
            elif name in SELECTORS and moved(values(mode, **{name: other}), mode):
                # refused for the base's flags in the new mode, or for a rule of its own
                assert "not apply in" in message or flag(name) in message, (mode, name)
            else:
                assert flag(name) in message, (mode, name, message)
            checked += 1
            continue
        assert rule is None, f"{flag(name)} in {mode}: expected a refusal ({rule})"
        if plan.mode != mode:  # a selector moved the plan to the mode it chooses
            assert name in SELECTORS and plan.mode in APPLIES[name], (mode, name, plan.mode)
        else:
            assert mode in APPLIES[name], f"{flag(name)} does not apply in {mode}: not refused"
            kept = plan.settings[name]
            assert kept is not None and kept != DEFAULTS[name], (mode, name, kept)
        checked += 1
    assert checked == len(OTHER)


def run(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            app(["generate", *args], standalone_mode=False)
            code = 0
        except InputError as error:
            print(error, file=err)
            code = 2
    return code, err.getvalue()


def test_flags_that_contradict_each_other_are_refused():
    with pytest.raises(InputError, match="--raw sends the prompt without a template"):
        make_plan(values("sample", raw=True, enable_thinking=False), DEFAULTS)


def test_the_reviewed_command_is_refused_before_the_model_loads(cli, tmp_path):
    """The three settings the code review found dropped silently (exit 0) in think mode:
    refused by name, before the (missing) model is looked for."""
    result = cli(
        "generate", str(tmp_path / "no-such-model"), "--prompt", "Hola", "--think-budget", "8",
        "--repetition-penalty", "1.7", "--presence-penalty", "1.5", "--max-new-tokens", "5",
        "--choice", "red,blue",
    )  # fmt: skip
    assert result.code == 2
    for name in ("--repetition-penalty", "--presence-penalty", "--max-new-tokens"):
        assert name in result.stderr
    assert "no-such-model" not in result.stderr and "think-then-answer" in result.stderr
    assert "in this mode use --think-budget, --answer-max-tokens" in result.stderr
    # the same with a beam search, and --seed where nothing is drawn
    beams = cli("generate", str(tmp_path / "none"), "--prompt", "Hola", "--num-beams", "2",
                "--seed", "1", "--stream")  # fmt: skip
    assert beams.code == 2 and "--seed, --stream" in beams.stderr and "beam search" in beams.stderr


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reads_every_setting_it_keeps(mode, tiny_kit, hybrid_kit, monkeypatch):
    """Run each mode on a tiny kit: the runner reads every setting the plan kept for it,
    so a flag the table applies cannot be dropped on the way to the engine."""
    model = hybrid_kit if mode.startswith("think") else tiny_kit
    budget = "answer_max_tokens" if mode in APPLIES["answer_max_tokens"] else "max_new_tokens"
    given = values(mode, model=str(model), **{budget: 4})
    plan = make_plan(given, DEFAULTS)
    printed: list[dict] = []
    monkeypatch.setattr(generate_cmd, "print_json", printed.append)
    monkeypatch.setattr("muestra.cli.structured_options.print_json", printed.append)
    generate_cmd.execute(plan)
    assert printed
    assert plan.settings.read == set(plan.settings), set(plan.settings) - plan.settings.read
