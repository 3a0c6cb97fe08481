"""`muestra generate`: sample a model N times and print one JSON line per sample."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from muestra.cli import structured_options
from muestra.cli.common import (
    MODEL_HELP,
    AllowPickleOption,
    BatchInvariantOption,
    DeviceOption,
    DtypeOption,
    KvCacheOption,
    RuntimeOption,
    ThreadsOption,
    ThreadWaitOption,
    TrustRemoteCodeOption,
    plural,
    print_json,
    stderr,
)
from muestra.cli.generate_plan import THINK, Plan, Settings, make_plan
from muestra.cli.sampling_options import parameter, sampling_flags, with_flags
from muestra.settings import NAMES, AnswerSettings


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


@with_flags(sampling_flags(), after="seed")
def generate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str | None = typer.Option(
        None, "--prompt", help="User message (plain text with --raw)."
    ),
    messages: Path | None = typer.Option(
        None, "--messages", help='JSON file: [{"role": "user", "content": "..."}, ...].'
    ),
    raw: bool = typer.Option(False, "--raw", help="Send --prompt as plain text, no chat template."),
    enable_thinking: bool | None = typer.Option(
        None, "--enable-thinking/--no-enable-thinking", help="Hybrid templates' thinking switch."
    ),
    n: int = typer.Option(1, "--n", min=1, help="Samples of the prompt (they share one prefill)."),
    seed: int | None = typer.Option(
        None,
        "--seed",
        help="Run seed; sample i gets its own seed from (seed, 0, i). Default: random.",
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Token budget."),
    stop: list[str] = typer.Option(
        [], "--stop", help="Stop string (repeatable); excluded from the text."
    ),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at EOS (benchmarks)."),
    logprobs: int | None = typer.Option(
        None,
        "--logprobs",
        min=0,
        max=20,
        help="Record each token's logprob and K alternatives (raw model and after sampling).",
    ),
    stream: bool = typer.Option(False, "--stream", help="Print text as it comes (needs --n 1)."),
    think_budget: int | None = typer.Option(
        None,
        "--think-budget",
        min=0,
        help="Think-then-answer mode: at most N thinking tokens, then the closing text is forced.",
    ),
    answer_max_tokens: int = typer.Option(
        AnswerSettings.model_fields["max_tokens"].default,
        "--answer-max-tokens",
        min=1,
        help="Token budget of the answer phase.",
    ),
    close_text: str | None = typer.Option(
        None,
        "--close-text",
        help="Text forced when the think budget runs out (default: Qwen's sentence + </think>; "
        "in text mode '\\n\\nFinal answer:\\n').",
    ),
    think_mode: str = typer.Option(
        "auto",
        "--think-mode",
        help="How the model reasons: tags (its own <think> block; none on a model without "
        "one), text (plain-text reasoning asked for in the prompt, any instruct model), auto "
        "(tags when the model has them, else text when --think-budget is given).",
    ),
    schema: Path | None = typer.Option(
        None, "--schema", help="JSON Schema file the answer must follow."
    ),
    regex: str | None = typer.Option(None, "--regex", help="Regex the answer must match."),
    choice: str | None = typer.Option(None, "--choice", help="Comma-separated allowed answers."),
    grammar: Path | None = typer.Option(
        None, "--grammar", help="EBNF grammar file for the answer."
    ),
    field_probs: bool = typer.Option(
        True,
        "--field-probs/--no-field-probs",
        help="Record each allowed value's probability for enum/boolean/choice answers.",
    ),
    num_beams: int = typer.Option(
        1,
        "--num-beams",
        min=1,
        max=64,
        help="Beam search with K beams (1 = off): --n best hypotheses, HF's semantics; "
        "with a grammar (--schema, --choice…), the --n most likely valid answers; "
        "no sampling, so no --temperature/--top-*/penalties/--seed.",
    ),
    length_penalty: float = typer.Option(
        1.0,
        "--length-penalty",
        help="Beam score = sum of log-probs / length ** X (>0 favours longer hypotheses).",
    ),
    early_stopping: str = typer.Option(
        "false",
        "--early-stopping",
        help="Beam search ends: true (as soon as K hypotheses are finished), false (when "
        "no running beam can still beat them, at the current length), never (the same, "
        "at the longest reachable length).",
    ),
    think_num_beams: int | None = typer.Option(
        None,
        "--think-num-beams",
        min=1,
        max=64,
        help="Beam-search the reasoning with K beams (needs --think-budget): the --n best "
        "reasonings, each closed and answered; no --think-temperature/--think-top-*.",
    ),
    prompt_lookup: int | None = typer.Option(
        None,
        "--prompt-lookup",
        min=1,
        max=64,
        help="Prompt-lookup decoding (greedy, --temperature 0, --n 1): draft up to N tokens "
        "copied from the prompt and text so far, verified in one forward; same output as "
        "greedy, faster when the answer copies its prompt.",
    ),
    draft_model: str | None = typer.Option(
        None,
        "--draft-model",
        help="Speculative decoding with this draft (all --n samples in one batch): a model with "
        "the same vocabulary, "
        "or layers:N for the model's own first N layers. Greedy output equals plain greedy; "
        "sampled output follows the same distribution.",
    ),
    num_speculative_tokens: int = typer.Option(
        4, "--num-speculative-tokens", min=1, max=32, help="Draft tokens per round."
    ),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Rows decoded at once."),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    allow_pickle: bool = AllowPickleOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str = RuntimeOption,
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    batch_invariant: bool = BatchInvariantOption,
    kv_cache: str | None = KvCacheOption,
    **sampling: Any,
) -> None:
    """Sample MODEL N times. One JSON line per sample on stdout:

    sample, seed, text, token_ids, finish_reason (stop|length), stop_reason, num_tokens,
    num_prompt_tokens, and logprobs with --logprobs. Each sample is reproducible from
    its seed and these options. Progress goes to stderr.

    Think-then-answer mode (--think-budget, --schema, --regex, --choice or --grammar):
    the model thinks with the --think-* settings (default: the model's generation
    config) for at most --think-budget tokens, then answers with the --answer-* settings
    (default greedy), constrained by the grammar. Lines then also carry reasoning,
    think_tokens, budget_hit, answer_text, answer, field_probs and error.

    Every flag applies in the mode the others choose (sampling, --prompt-lookup,
    --draft-model, --num-beams, think-then-answer) or is refused by name before the
    model loads.

    \f
    (For readers of the code: one piece, because typer reads a command's options from its
    signature; each option is a parameter, and the body is short.)
    """
    defaults = {param.name: param.default for param in ctx.command.params}
    execute(make_plan(ctx.params, defaults))


def execute(plan: Plan) -> None:
    """Load the model, encode the prompt, and run the plan's mode."""
    from muestra.models.loading import load_model, resolve_model

    s = plan.settings
    grammar = None
    if "schema" in s:
        grammar = structured_options.grammar_spec(
            s["schema"], s["regex"], s["choice"], s["grammar"]
        )
    # a missing model is refused before torch loads (the engine, the prompt's tools)
    resolve_model(s["model"], allow_pickle=s["allow_pickle"],
                  trust_remote_code=s["trust_remote_code"])  # fmt: skip
    from muestra.answers.generation import TextGenerator
    from muestra.answers.phases import with_instruction
    from muestra.models.inspection import read_messages

    prompt = s["prompt"]
    conversation = read_messages(s["messages"]) if s["messages"] is not None else None
    if conversation is None and not s["raw"]:
        conversation = [{"role": "user", "content": prompt or ""}]
    loaded = load_model(
        s["model"],
        dtype=s["dtype"],
        device=s["device"],
        allow_pickle=s["allow_pickle"],
        trust_remote_code=s["trust_remote_code"],
        runtime=s["runtime"],
        threads=s["threads"],
        thread_wait=s["thread_wait"],
        batch_invariant=s["batch_invariant"],
        kv_cache=s["kv_cache"],
    )
    generator = TextGenerator(loaded, max_batch=s.get("max_batch", 64))
    phases = None
    if plan.mode in THINK:
        phases = structured_options.phases(structured_options.phase_settings(s), loaded)
        think = phases.think
        assert think is not None
        if think.mode == "text":
            if conversation is not None:
                conversation = with_instruction(conversation, think.instruction)
            else:
                prompt = with_instruction(prompt or "", think.instruction)
    if conversation is not None:
        ids = generator.encode_messages(conversation, s["enable_thinking"])
    else:
        ids = generator.encode_prompt(prompt or "")
    if phases is not None:
        _think_then_answer(plan, loaded, ids, phases, grammar)
    elif plan.mode == "beam-answer":
        _print_beam_answers(loaded, ids, grammar, _beams(s, "num_beams", s["n"]), s)
    elif plan.mode == "beams":
        _print_beams(generator, ids, s)
    elif plan.mode in ("lookup", "speculative"):
        _print_drafted(generator, ids, plan.mode, s)
    else:
        _print_samples(generator, ids, s)


def _params(s: Settings):
    """SamplingParams from the sampling settings the mode applies (the rest stay off)."""
    from muestra.engine import SamplingParams

    return SamplingParams(**{name: s[name] for name in NAMES if parameter(name) in s})


def _beams(s: Settings, name: str, returned: int):
    from muestra.engine.beam import BeamParams

    params = BeamParams(s[name], s["length_penalty"], s["early_stopping"], returned)
    params.check()
    return params


def _think_then_answer(plan: Plan, loaded: Any, ids: list[int], phases: Any, grammar: Any) -> None:
    s = plan.settings
    structured_options.run(
        loaded,
        ids,
        n=s["n"],
        seed=s.get("seed"),
        phases=phases,
        grammar=grammar,
        field_probs=s["field_probs"],
        max_batch=s["max_batch"],
        think_beams=_beams(s, "think_num_beams", s["n"]) if "think_num_beams" in s else None,
        # after a reasoning, each sample gets its best answer (one per beam search)
        answer_beams=_beams(s, "num_beams", 1) if "num_beams" in s else None,
    )


def _print_samples(generator: Any, ids: list[int], s: Settings) -> None:
    params = _params(s)
    requests = generator.requests(
        [ids],
        n=s["n"],
        params=params,
        max_new_tokens=s["max_new_tokens"],
        seed=s["seed"],
        stop=s["stop"],
        ignore_eos=s["ignore_eos"],
        logprobs=s["logprobs"],
    )
    started = time.perf_counter()
    if s["stream"]:
        for delta, done in generator.stream_text(requests[0]):
            sys.stdout.write(delta)
            sys.stdout.flush()
            if done is not None:
                sys.stdout.write("\n")
                elapsed = time.perf_counter() - started
                stderr.print(
                    f"[{done.finish_reason}] {done.num_tokens} tokens in {elapsed:.2f}s "
                    f"({done.num_tokens / elapsed:.1f} tok/s), seed {done.seed}",
                    markup=False,
                )
        return
    samples = _run_with_progress(generator, requests)
    for sample in samples:
        data = sample.as_dict()
        data.pop("prompt_index")
        if params.temperature == 0:
            data["seed"] = None  # greedy: nothing was drawn (the line is the same every call)
        print_json(data)
    elapsed = time.perf_counter() - started
    total = sum(s.num_tokens for s in samples)
    stderr.print(
        f"{len(samples)} {plural(len(samples), 'sample')}, {total} tokens in {elapsed:.2f}s "
        f"({total / elapsed:.1f} tok/s)",
        markup=False,
    )


def _print_beams(generator: Any, ids: list[int], s: Settings) -> None:
    started = time.perf_counter()
    beams = _beams(s, "num_beams", s["n"])
    hypotheses = generator.beam_search(
        [ids], beams, max_new_tokens=s["max_new_tokens"], ignore_eos=s["ignore_eos"]
    )
    for hypothesis in hypotheses:
        data = hypothesis.as_dict()
        data.pop("prompt_index")
        print_json(data)
    stderr.print(
        f"beam search, {beams.num_beams} beams: {len(hypotheses)} hypotheses in "
        f"{time.perf_counter() - started:.2f}s",
        markup=False,
    )


def _print_drafted(generator: Any, ids: list[int], mode: str, s: Settings) -> None:
    """Speculative (a draft model or layers:N) or prompt-lookup decoding of the samples,
    as one ragged batch."""
    from muestra.engine.seeds import sample_seed

    lookup = mode == "lookup"
    request = generator.requests(
        [ids],
        n=s["n"],
        params=_params(s),
        max_new_tokens=s["max_new_tokens"],
        seed=None if lookup else s["seed"],
        ignore_eos=s["ignore_eos"],
    )[0]
    started = time.perf_counter()
    if lookup:
        from muestra.engine.lookup import lookup_decode

        results = lookup_decode(generator.engine, [request], num_tokens=s["prompt_lookup"])[0]
        key = "prompt_lookup"
    else:
        from muestra.answers.drafted import load_draft
        from muestra.engine.speculative import speculative_decode

        device = str(generator.engine.device)
        draft = load_draft(generator.loaded, s["draft_model"], s["dtype"], device)
        k = s["num_speculative_tokens"]
        results = speculative_decode(generator.engine, draft, [request], k)[0]
        key = "speculative"
    elapsed = time.perf_counter() - started
    for index, result in enumerate(results):
        ids = result.token_ids
        shown = ids[:-1] if result.finish_reason == "stop" else ids
        rounds = {"forwards": result.forwards} if lookup else {"rounds": result.rounds}
        greedy = request.params.temperature == 0
        line = {
            "sample": index,
            # greedy: nothing was drawn, so no seed (as plain greedy lines)
            "seed": None if greedy else sample_seed(request.seed, request.prompt_index, index),
            "text": b"".join(generator.token_bytes[t] for t in shown).decode("utf-8", "replace"),
            "token_ids": ids,
            "finish_reason": result.finish_reason,
            "stop_reason": ids[-1] if result.finish_reason == "stop" and ids else None,
            "num_prompt_tokens": len(request.prompt_ids),
            "num_tokens": len(ids),
            key: {
                **rounds,
                "drafted": result.drafted,
                "accepted": result.accepted,
                "acceptance_rate": result.acceptance_rate,
            },
        }
        print_json(line)
    tokens = sum(len(r.token_ids) for r in results)
    drafted = sum(r.drafted for r in results)
    accepted = sum(r.accepted for r in results) / drafted if drafted else 0.0
    stderr.print(
        f"{key.replace('_', ' ')}: {len(results)} sample(s), {tokens} tokens in {elapsed:.2f}s "
        f"({tokens / elapsed:.1f} tok/s), {accepted:.0%} of drafted tokens accepted",
        markup=False,
    )


def _print_beam_answers(loaded: Any, ids: list[int], grammar: Any, beams: Any, s: Settings) -> None:
    from muestra.answers.beam_answers import beam_answers
    from muestra.answers.structured import StructuredGenerator

    started = time.perf_counter()
    generator = StructuredGenerator(loaded, max_batch=s["max_batch"])
    answers = beam_answers(generator, ids, grammar, beams, s["answer_max_tokens"])
    for answer in answers:
        print_json(answer.as_dict())
    stderr.print(
        f"beam search under the grammar, {beams.num_beams} beams: {len(answers)} answers in "
        f"{time.perf_counter() - started:.2f}s",
        markup=False,
    )


def _run_with_progress(generator, requests):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(r.n for r in requests)
    samples = []
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TextColumn("{task.fields[tokens]} tokens"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    ) as progress:
        task = progress.add_task("generate", total=total, tokens=0)
        tokens = 0
        for event in generator.engine.stream(requests):
            tokens += len(event.tokens)
            progress.update(task, advance=len(event.finished), tokens=tokens)
            samples += [
                generator.to_text_sample(s, requests[s.request_index].prompt_index)
                for s in event.finished
            ]
    samples.sort(key=lambda s: (s.prompt_index, s.sample))
    return samples
