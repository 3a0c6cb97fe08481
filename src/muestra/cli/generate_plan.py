"""`muestra generate`'s plan: from the parsed flags to one mode and the settings it applies.

Pure (no model, no torch), and run before anything loads. The mode follows from a few
flags (`mode_of`); `APPLIES` is the one table of which flag applies in which mode; a flag
given with a value other than its default in a mode where it does not apply is refused by
name (`make_plan`). The plan's `settings` hold exactly the flags that apply, and they record
which of them were read: a test runs every mode and checks that each one was (nothing is
dropped between the table and the engine).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from muestra.cli.sampling_options import parameter, sampling_values
from muestra.errors import InputError
from muestra.settings import LOOKUP, NAMES, PHASED, SAMPLE, SPECULATIVE, Sampling, use

MODES = (
    "sample",
    "lookup",
    "speculative",
    "beams",
    "beam-answer",
    "think",
    "think+answer-beams",
    "think-beams",
    "think-beams+answer-beams",
)

# what each mode is, and what to do instead, for the refusal
DESCRIPTIONS = {
    "sample": "plain sampling",
    "lookup": "prompt-lookup decoding (--prompt-lookup: greedy, one sample, no penalties, "
    "stop strings or logprobs)",
    "speculative": "speculative decoding (--draft-model: temperature, top-k, top-p and min-p; "
    "no penalties, DoLa, stop strings or logprobs)",
    "beams": "beam search (--num-beams: it scores the model's own log-probabilities and "
    "draws nothing)",
    "beam-answer": "beam search under a grammar (--num-beams with --schema, --regex, --choice "
    "or --grammar: it draws nothing; the answer's budget is --answer-max-tokens)",
    "think": "think-then-answer mode (--think-budget or an answer grammar: --think-* set the "
    "reasoning, --answer-* the answer)",
    "think+answer-beams": "think-then-answer mode with beam-searched answers (--num-beams: "
    "--think-* set the reasoning; the answer draws nothing)",
    "think-beams": "think-then-answer mode with beam-searched reasoning (--think-num-beams: "
    "the reasoning draws nothing; --answer-* set the answer)",
    "think-beams+answer-beams": "think-then-answer mode with beam search in both phases "
    "(--think-num-beams and --num-beams: nothing is drawn)",
}

ALL = frozenset(MODES)
THINK = frozenset(m for m in MODES if m.startswith("think"))
SAMPLED_REASONING = frozenset({"think", "think+answer-beams"})
SAMPLED_ANSWER = frozenset({"think", "think-beams"})
ANSWER_BEAMS = frozenset({"beams", "beam-answer", "think+answer-beams", "think-beams+answer-beams"})
ANY_BEAMS = ANSWER_BEAMS | {"think-beams"}
PLAIN = frozenset({"sample", "lookup", "speculative", "beams"})

LOAD = (
    "model",
    "dtype",
    "device",
    "allow_pickle",
    "trust_remote_code",
    "runtime",
    "threads",
    "thread_wait",
    "batch_invariant",
    "kv_cache",
)
INPUT = ("prompt", "messages", "raw", "enable_thinking", "n")


def sampling_applies(prefix: str = "") -> dict[str, frozenset[str]]:
    """Where each sampling flag applies, from its setting's `Use` (muestra/settings.py):
    a plain flag in the plain modes its strategies name, a phase's flag (prefix "think_"
    or "answer_") wherever that phase is sampled."""
    if prefix:
        modes = SAMPLED_REASONING if prefix == "think_" else SAMPLED_ANSWER
        return {parameter(name, prefix): modes for name in PHASED}
    plain = {SAMPLE, LOOKUP, SPECULATIVE}
    return {parameter(name): frozenset(use(name).strategies & plain) for name in NAMES}


APPLIES: dict[str, frozenset[str]] = {
    **{name: ALL for name in LOAD + INPUT},
    # plain generation
    "seed": frozenset({"sample", "speculative"}) | SAMPLED_REASONING | SAMPLED_ANSWER,
    **sampling_applies(),
    "stop": frozenset({"sample"}),
    "logprobs": frozenset({"sample"}),
    "stream": frozenset({"sample"}),
    "max_new_tokens": PLAIN,
    "ignore_eos": PLAIN,
    "max_batch": frozenset({"sample", "beams", "beam-answer"}) | THINK,
    # the reasoning
    "think_budget": THINK,
    "think_mode": THINK,
    "close_text": THINK,
    **sampling_applies("think_"),
    "think_num_beams": frozenset({"think-beams", "think-beams+answer-beams"}),
    # the answer
    **sampling_applies("answer_"),
    "answer_max_tokens": THINK | {"beam-answer"},
    "schema": THINK | {"beam-answer"},
    "regex": THINK | {"beam-answer"},
    "choice": THINK | {"beam-answer"},
    "grammar": THINK | {"beam-answer"},
    "field_probs": THINK,
    # beam search
    "num_beams": ANSWER_BEAMS,
    "length_penalty": ANY_BEAMS,
    "early_stopping": ANY_BEAMS,
    # drafting
    "prompt_lookup": frozenset({"lookup"}),
    "draft_model": frozenset({"speculative"}),
    "num_speculative_tokens": frozenset({"speculative"}),
}


# what to use instead of a refused flag, beside its --think-/--answer- namesakes
INSTEAD = {
    "max_new_tokens": ("think_budget", "answer_max_tokens"),
    "num_beams": ("think_num_beams",),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Settings(Mapping[str, Any]):
    """The settings a mode applies; remembers which were read (see the module's doc)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> Any:
        value = self._values[name]
        self.read.add(name)
        return value

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"


@dataclass(frozen=True)
class Plan:
    mode: str
    settings: Settings


def mode_of(values: Mapping[str, Any]) -> str:
    """The mode the flags ask for (the flags that choose it are in this function only)."""
    grammar = any(values[k] is not None for k in ("schema", "regex", "choice", "grammar"))
    answer_beams = values["num_beams"] > 1
    if values["think_num_beams"] is not None and values["think_budget"] is None:
        raise InputError("--think-num-beams needs --think-budget (the reasoning's length)")
    if values["think_budget"] is not None or (grammar and not answer_beams):
        reasoning = "think-beams" if values["think_num_beams"] is not None else "think"
        return reasoning + ("+answer-beams" if answer_beams else "")
    if grammar:
        return "beam-answer"
    if answer_beams:
        return "beams"
    if values["draft_model"] is not None and values["prompt_lookup"] is not None:
        raise InputError("give one of --draft-model and --prompt-lookup, not both")
    if values["draft_model"] is not None:
        return "speculative"
    if values["prompt_lookup"] is not None:
        return "lookup"
    return "sample"


def make_plan(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> Plan:
    """Check the flags against the table and each other; refuse by name what does not apply.

    `values` are every flag's parsed value, `defaults` their defaults (the command's own).
    """
    unknown = set(values) ^ set(APPLIES)
    assert not unknown, f"flags missing from the table or the command: {sorted(unknown)}"
    mode = mode_of(values)
    refused = [
        name for name in APPLIES if mode not in APPLIES[name] and values[name] != defaults[name]
    ]
    if refused:
        names = ", ".join(flag(name) for name in refused)
        verb = "does" if len(refused) == 1 else "do"
        # a phase's own flag for a plain one (--dola-layers → --think-/--answer-dola-layers)
        phased = [
            flag(other)
            for name in refused
            for other in ("think_" + name, "answer_" + name, *INSTEAD.get(name, ()))
            if mode in APPLIES.get(other, ())
        ]
        instead = f"; in this mode use {', '.join(phased)}" if phased else ""
        raise InputError(
            f"{names} {verb} not apply in {DESCRIPTIONS[mode]}; leave "
            f"{'it' if len(refused) == 1 else 'them'} out{instead}"
        )
    settings = {name: values[name] for name in APPLIES if mode in APPLIES[name]}
    if "stop" in settings:
        settings["stop"] = list(settings["stop"])
    _check_values(mode, settings)
    settings = sampling_values(settings)  # bounds held, DoLa's layers parsed
    if "early_stopping" in settings:
        settings["early_stopping"] = early_stopping(settings["early_stopping"])
    return Plan(mode, Settings(settings))


def _changed(value: Any, default: Any) -> bool:
    if isinstance(value, list | tuple) and isinstance(default, list | tuple):
        return tuple(value) != tuple(default)  # click gives a tuple for a repeatable flag
    return value != default


def _check_values(mode: str, s: Mapping[str, Any]) -> None:
    """The checks between flags that apply together."""
    if (s["prompt"] is None) == (s["messages"] is None):
        raise InputError("give exactly one of --prompt TEXT or --messages FILE.json")
    if s["raw"] and s["messages"] is not None:
        raise InputError("--raw applies to --prompt; --messages always uses the chat template")
    if s["raw"] and s["enable_thinking"] is not None:
        raise InputError(
            "--enable-thinking/--no-enable-thinking switch the chat template's thinking; "
            "--raw sends the prompt without a template: leave one of them out"
        )
    if s.get("stream") and s["n"] != 1:
        raise InputError(f"--stream follows one sample; use --n 1 (got --n {s['n']})")
    if mode == "lookup":
        if s["n"] != 1:
            raise InputError(
                f"--prompt-lookup is greedy: every sample would be the same; use --n 1 "
                f"(got --n {s['n']})"
            )
        temperature = plain_sampling(s).temperature
        if temperature != 0:
            raise InputError(
                f"--prompt-lookup is greedy decoding: add --temperature 0 (got {temperature})"
            )
    if "think_mode" in s and s["think_mode"] not in ("auto", "tags", "text"):
        raise InputError(f"--think-mode {s['think_mode']!r} must be auto, tags or text")
    # beam search returns at most one hypothesis per beam
    returned = {
        "beams": ("num_beams", s["n"]),
        "beam-answer": ("num_beams", s["n"]),
        "think+answer-beams": ("num_beams", 1),
        "think-beams": ("think_num_beams", s["n"]),
        "think-beams+answer-beams": ("think_num_beams", s["n"]),
    }.get(mode)
    if returned is not None and returned[1] > s[returned[0]]:
        name, n = returned
        raise InputError(
            f"--n {n} with {flag(name)} {s[name]}: beam search returns at most one "
            f"hypothesis per beam; raise {flag(name)} or lower --n"
        )


def plain_sampling(s: Mapping[str, Any]) -> Sampling:
    """The plain sampling flags the mode applies, as the setting (the others: defaults)."""
    return Sampling(**{name: s[name] for name in NAMES if parameter(name) in s})


def early_stopping(text: str) -> bool | str:
    stopping = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if stopping is None:
        raise InputError(f"--early-stopping {text!r}: use true, false or never")
    return stopping
