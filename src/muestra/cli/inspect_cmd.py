"""`muestra tokens`, `muestra chat`, `muestra next`: what happens before generation."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from muestra.cli.common import (
    MODEL_HELP,
    AllowPickleOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    RuntimeOption,
    ThreadsOption,
    ThreadWaitOption,
    TrustRemoteCodeOption,
    print_json,
    stdout,
    visible,
)


def register(app: typer.Typer) -> None:
    app.command("tokens")(tokens)
    app.command("chat")(chat)
    app.command("next")(next_token)


def tokens(
    model: str = typer.Argument(..., help=MODEL_HELP),
    text: str = typer.Argument(..., help="Text to tokenize (no template, no BOS added)."),
    compare: str | None = typer.Option(
        None, "--compare", help="A second model whose tokenizer is shown side by side."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Show the token ids of TEXT, the tokens as the tokenizer stores them, and their count.

    JSON: {"model", "ids", "tokens", "count"} (a list of two when comparing).
    """
    from muestra.models.loading import load_tokenizer, resolve_model

    refs = [model] + ([compare] if compare else [])
    for ref in refs:
        resolve_model(ref)  # a missing model is refused before torch loads
    from muestra.models.inspection import tokenize

    views = [(ref, tokenize(load_tokenizer(ref), text)) for ref in refs]
    if as_json:
        rows = [
            {"model": ref, "ids": v.ids, "tokens": v.tokens, "count": v.count} for ref, v in views
        ]
        print_json(rows if compare else rows[0])
        return
    table = Table(title=f"{visible(text)}")
    for ref, _ in views:
        table.add_column(f"{ref}\nid", justify="right")
        table.add_column("token")
        table.add_column("piece")
    longest = max(v.count for _, v in views)
    for i in range(longest):
        cells: list[str] = []
        for _, view in views:
            if i < view.count:
                cells += [str(view.ids[i]), visible(view.tokens[i]), visible(view.pieces[i])]
            else:
                cells += ["", "", ""]
        table.add_row(*cells)
    stdout.print(table)
    for ref, view in views:
        stdout.print(f"{ref}: {view.count} tokens")


def chat(
    model: str = typer.Argument(..., help=MODEL_HELP),
    messages: Path = typer.Option(
        ..., "--messages", help='JSON file: [{"role": "user", "content": "..."}, ...].'
    ),
    generation_prompt: bool = typer.Option(
        True,
        "--generation-prompt/--no-generation-prompt",
        help="End with the assistant's opening (as for generation).",
    ),
    enable_thinking: bool | None = typer.Option(
        None,
        "--enable-thinking/--no-enable-thinking",
        help="Hybrid Qwen3 templates: open or close the thinking block (default: template's).",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Render MESSAGES through the model's chat template: the text and its ids.

    JSON: {"text", "ids"}.
    """
    from muestra.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    from muestra.models.inspection import read_messages, render_chat

    text, ids = render_chat(tokenizer, read_messages(messages), generation_prompt, enable_thinking)
    if as_json:
        print_json({"text": text, "ids": ids})
        return
    stdout.rule("template text")
    stdout.out(text)
    stdout.rule(f"{len(ids)} ids")
    stdout.out(str(ids))


def next_token(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Argument(..., help="User message (or plain text with --raw)."),
    top: int = typer.Option(10, "--top", min=1, help="How many candidates to list."),
    raw: bool = typer.Option(False, "--raw", help="Use PROMPT as plain text, no chat template."),
    enable_thinking: bool | None = typer.Option(
        None, "--enable-thinking/--no-enable-thinking", help="Hybrid templates' thinking switch."
    ),
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    allow_pickle: bool = AllowPickleOption,
    trust_remote_code: bool = TrustRemoteCodeOption,
    runtime: str = RuntimeOption,
    threads: int | None = ThreadsOption,
    thread_wait: str | None = ThreadWaitOption,
    as_json: bool = JsonOption,
) -> None:
    """The most likely next tokens: rank, id, token, logit, probability, cumulative.

    Probabilities are the softmax of the model's raw logits (no temperature or top-k).
    """
    from muestra.models.loading import load_model, resolve_model

    resolve_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    from muestra.models.inspection import next_token_table, prompt_ids  # torch: after the check

    loaded = load_model(
        model,
        dtype=dtype,
        device=device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        runtime=runtime,  # type: ignore[arg-type]
        threads=threads,
        thread_wait=thread_wait,
    )
    ids = prompt_ids(loaded.tokenizer, prompt, raw, enable_thinking)
    rows = next_token_table(loaded.runtime, loaded.tokenizer, ids, top)
    if as_json:
        print_json(
            {"model": model, "prompt_ids": ids, "candidates": [row.__dict__ for row in rows]}
        )
        return
    table = Table(title=f"next token after {len(ids)} prompt tokens")
    for name in ("rank", "id", "token", "piece", "logit", "prob", "cum"):
        table.add_column(name, justify="right" if name not in ("token", "piece") else "left")
    for row in rows:
        table.add_row(
            str(row.rank),
            str(row.id),
            visible(row.token),
            visible(row.piece),
            f"{row.logit:.3f}",
            f"{row.probability:.4f}",
            f"{row.cumulative:.4f}",
        )
    stdout.print(table)
