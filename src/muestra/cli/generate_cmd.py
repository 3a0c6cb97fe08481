"""`muestra generate`: sample a model N times and print one JSON line per sample."""

from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

import typer

from muestra.cli import structured_options
from muestra.cli.common import (
    MODEL_HELP,
    AllowPickleOption,
    BatchInvariantOption,
    DeviceOption,
    DtypeOption,
    RuntimeOption,
    ThreadsOption,
    TrustRemoteCodeOption,
    plural,
    print_json,
    stderr,
)
from muestra.errors import InputError


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


def generate(
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
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus mass (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", min=0.0, max=1.0, help="Min probability ratio."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="HF semantics, on prompt and output tokens (1 = off)."
    ),
    presence_penalty: float = typer.Option(
        0.0, "--presence-penalty", help="OpenAI semantics, on output tokens (0 = off)."
    ),
    frequency_penalty: float = typer.Option(
        0.0, "--frequency-penalty", help="OpenAI semantics, on output tokens (0 = off)."
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
    think_temperature: float | None = typer.Option(None, "--think-temperature", min=0.0),
    think_top_p: float | None = typer.Option(None, "--think-top-p", min=0.0, max=1.0),
    think_top_k: int | None = typer.Option(None, "--think-top-k", min=0),
    think_min_p: float | None = typer.Option(None, "--think-min-p", min=0.0, max=1.0),
    answer_temperature: float = typer.Option(
        0.0, "--answer-temperature", min=0.0, help="Answer phase (default greedy, as seed 000)."
    ),
    answer_top_p: float = typer.Option(1.0, "--answer-top-p", min=0.0, max=1.0),
    answer_top_k: int = typer.Option(0, "--answer-top-k", min=0),
    answer_min_p: float = typer.Option(0.0, "--answer-min-p", min=0.0, max=1.0),
    answer_max_tokens: int = typer.Option(
        256, "--answer-max-tokens", min=1, help="Token budget of the answer phase."
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
    dola_layers: str | None = typer.Option(
        None,
        "--dola-layers",
        help="DoLa (contrast with early layers): low, high, or layer indices like 2,4,6; "
        "then sampling as usual on the contrasted logits (try --repetition-penalty 1.2).",
    ),
    think_dola_layers: str | None = typer.Option(
        None, "--think-dola-layers", help="DoLa in the think phase (as --dola-layers)."
    ),
    answer_dola_layers: str | None = typer.Option(
        None, "--answer-dola-layers", help="DoLa in the answer phase (as --dola-layers)."
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
    batch_invariant: bool = BatchInvariantOption,
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
    """
    from muestra.answers.generation import TextGenerator
    from muestra.answers.phases import with_instruction
    from muestra.engine import SamplingParams
    from muestra.models.inspection import read_messages
    from muestra.models.loading import load_model

    if (prompt is None) == (messages is None):
        raise InputError("give exactly one of --prompt TEXT or --messages FILE.json")
    if raw and messages is not None:
        raise InputError("--raw applies to --prompt; --messages always uses the chat template")
    if stream and n != 1:
        raise InputError(f"--stream follows one sample; use --n 1 (got --n {n})")
    answer_grammar = structured_options.grammar_spec(schema, regex, choice, grammar)
    structured = think_budget is not None or answer_grammar is not None
    if not structured and (think_num_beams or think_dola_layers or answer_dola_layers):
        raise InputError(
            "--think-num-beams, --think-dola-layers and --answer-dola-layers apply in "
            "think-then-answer mode (--think-budget, or an answer grammar)"
        )
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        dola_layers=_dola_layers(dola_layers),
    )
    beams = think_beams = None
    if num_beams > 1:
        # after a sampled reasoning, each sample gets its best answer (one per beam search)
        returned = 1 if think_budget is not None else n
        beams = _beam_params(num_beams, length_penalty, early_stopping, returned)
        _refuse_with_beams(
            params=params,
            seed=seed if think_budget is None else None,
            stop=stop,
            logprobs=logprobs,
            stream=stream,
            answer_dola_layers=answer_dola_layers,
            answer_temperature=answer_temperature or None,
            answer_top_p=answer_top_p if answer_top_p != 1.0 else None,
            answer_top_k=answer_top_k or None,
            answer_min_p=answer_min_p or None,
        )
    if think_num_beams is not None:
        if think_budget is None:
            raise InputError("--think-num-beams needs --think-budget (the reasoning's length)")
        think_beams = _beam_params(think_num_beams, length_penalty, early_stopping, n)
        given = {
            "think_temperature": think_temperature,
            "think_top_p": think_top_p,
            "think_top_k": think_top_k,
            "think_min_p": think_min_p,
            "think_dola_layers": think_dola_layers,
        }
        changed = ["--" + k.replace("_", "-") for k, v in given.items() if v is not None]
        if changed:
            raise InputError(
                f"{', '.join(changed)}: beam search over the reasoning scores the model's own "
                "log-probabilities; leave them out with --think-num-beams"
            )
    if dola_layers is not None and (structured or beams is not None):
        raise InputError(
            "--dola-layers applies to plain generation (not with --num-beams); in "
            "think-then-answer mode use --think-dola-layers and --answer-dola-layers"
        )
    conversation = read_messages(messages) if messages is not None else None
    if conversation is None and not raw:
        conversation = [{"role": "user", "content": prompt or ""}]
    loaded = load_model(
        model,
        dtype=dtype,
        device=device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        runtime=runtime,  # type: ignore[arg-type]
        threads=threads,
        batch_invariant=batch_invariant,
    )
    generator = TextGenerator(loaded, max_batch=max_batch)
    think = None
    if structured and (beams is None or think_budget is not None):
        think = structured_options.think_config(
            loaded,
            think_budget,
            close_text,
            think_mode,
            think_temperature,
            think_top_p,
            think_top_k,
            think_min_p,
            _dola_layers(think_dola_layers, "--think-dola-layers"),
        )
        if think.mode == "text":
            if conversation is not None:
                conversation = with_instruction(conversation, think.instruction)
            else:
                prompt = with_instruction(prompt or "", think.instruction)
    if conversation is not None:
        ids = generator.encode_messages(conversation, enable_thinking)
    else:
        ids = generator.encode_prompt(prompt or "")
    if think is not None:
        structured_options.refuse_plain_flags(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            stream=stream,
            stop=stop,
            logprobs=logprobs,
            ignore_eos=ignore_eos,
        )
        answer = structured_options.answer_config(
            answer_temperature,
            answer_top_p,
            answer_top_k,
            answer_min_p,
            answer_max_tokens,
            _dola_layers(answer_dola_layers, "--answer-dola-layers"),
        )
        structured_options.run(
            loaded,
            ids,
            n=n,
            seed=seed,
            think=think,
            answer=answer,
            grammar=answer_grammar,
            field_probs=field_probs,
            max_batch=max_batch,
            think_beams=think_beams,
            answer_beams=beams,
        )
        return
    if draft_model is not None or prompt_lookup is not None:
        if structured or beams is not None or stream:
            raise InputError(
                "--draft-model and --prompt-lookup apply to plain generation (not with "
                "--num-beams, --stream, a grammar or a think budget)"
            )
        request = generator.requests(
            [ids], n=n, params=params, max_new_tokens=max_new_tokens, seed=seed, stop=stop,
            ignore_eos=ignore_eos, logprobs=logprobs,
        )[0]  # fmt: skip
        _print_drafted(
            generator, request, draft_model, num_speculative_tokens, prompt_lookup, dtype
        )
        return
    if beams is not None and answer_grammar is not None:
        _print_beam_answers(loaded, ids, answer_grammar, beams, answer_max_tokens, max_batch)
        return
    if beams is not None:
        started = time.perf_counter()
        hypotheses = generator.beam_search(
            [ids], beams, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos
        )
        for hypothesis in hypotheses:
            data = hypothesis.as_dict()
            data.pop("prompt_index")
            print_json(data)
        stderr.print(
            f"beam search, {num_beams} beams: {len(hypotheses)} hypotheses in "
            f"{time.perf_counter() - started:.2f}s",
            markup=False,
        )
        return
    requests = generator.requests(
        [ids],
        n=n,
        params=params,
        max_new_tokens=max_new_tokens,
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )
    started = time.perf_counter()
    if stream:
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


def _dola_layers(text: str | None, flag: str = "--dola-layers") -> str | tuple[int, ...] | None:
    if text is None or text in ("low", "high"):
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"{flag} {text!r}: use low, high or comma-separated layer indices (2,4,6)"
        ) from None


def _beam_params(num_beams: int, length_penalty: float, early_stopping: str, n: int):
    from muestra.engine.beam import BeamParams

    stopping = {"true": True, "false": False, "never": "never"}.get(early_stopping.lower())
    if stopping is None:
        raise InputError(f"--early-stopping {early_stopping!r}: use true, false or never")
    if n > num_beams:
        raise InputError(
            f"--n {n} with --num-beams {num_beams}: beam search returns at most one "
            "hypothesis per beam; raise --num-beams or lower --n"
        )
    params = BeamParams(num_beams, length_penalty, stopping, n)  # type: ignore[arg-type]
    params.check()
    return params


def _print_drafted(
    generator, request, draft_ref: str | None, k: int, lookup: int | None, dtype: str
) -> None:
    """Speculative (a draft model or layers:N) or prompt-lookup decoding of a request's
    samples, as one ragged batch."""
    from muestra.engine.seeds import sample_seed

    started = time.perf_counter()
    if draft_ref is None:
        from muestra.engine.lookup import lookup_decode

        if request.n != 1:
            raise InputError(
                f"--prompt-lookup is greedy: every sample would be the same; use --n 1 "
                f"(got --n {request.n})"
            )
        results = lookup_decode(generator.engine, [request], num_tokens=lookup or 10)[0]
        key = "prompt_lookup"
    else:
        from muestra.answers.drafted import load_draft
        from muestra.engine.speculative import speculative_decode

        draft = load_draft(generator.loaded, draft_ref, dtype, str(generator.engine.device))
        results = speculative_decode(generator.engine, draft, [request], k)[0]
        key = "speculative"
    elapsed = time.perf_counter() - started
    for index, result in enumerate(results):
        ids = result.token_ids
        shown = ids[:-1] if result.finish_reason == "stop" else ids
        rounds = {"forwards": result.forwards} if draft_ref is None else {"rounds": result.rounds}
        greedy = draft_ref is None or request.params.temperature == 0
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


def _print_beam_answers(loaded, ids, grammar, beams, max_tokens: int, max_batch: int) -> None:
    from muestra.answers.beam_answers import beam_answers
    from muestra.answers.structured import StructuredGenerator

    started = time.perf_counter()
    generator = StructuredGenerator(loaded, max_batch=max_batch)
    answers = beam_answers(generator, ids, grammar, beams, max_tokens)
    for answer in answers:
        print_json(answer.as_dict())
    stderr.print(
        f"beam search under the grammar, {beams.num_beams} beams: {len(answers)} answers in "
        f"{time.perf_counter() - started:.2f}s",
        markup=False,
    )


def _refuse_with_beams(*, params, **given) -> None:
    """Beam search draws nothing: refuse, by name, every flag that would change sampling."""
    from muestra.engine import SamplingParams

    default = SamplingParams()
    changed = [
        f.name for f in fields(params) if getattr(params, f.name) != getattr(default, f.name)
    ]
    changed += [name for name, value in given.items() if value not in (None, [], False)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise InputError(
            f"{flags}: beam search scores the model's own log-probabilities and draws "
            "nothing; leave them out with --num-beams"
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
