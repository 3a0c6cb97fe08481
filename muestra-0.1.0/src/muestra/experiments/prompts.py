"""What one (condition, prompt item) pair sends to a model, shared by every backend.

The local runner and the remote runner both build requests from these two functions,
so a spec's prompt and think budget mean the same thing wherever it runs.
"""

from __future__ import annotations

from muestra.experiments.spec import Condition, LoadedSpec, PromptItem, fill


def messages_for(spec: LoadedSpec, item: PromptItem) -> list[dict[str, str]] | str:
    """The chat messages of `item` (or its raw text when the spec's prompt is raw)."""
    prompt = spec.spec.prompt
    variables = item.variables
    user = fill(prompt.user, variables)
    if prompt.raw:
        return user
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": fill(prompt.system, variables)})
    messages.append({"role": "user", "content": user})
    return messages


def think_budget(condition: Condition, item: PromptItem) -> int | None:
    """The item's own think budget, else the condition's; None when nothing thinks."""
    if condition.think is None:
        return None
    return item.think_budget if item.think_budget is not None else condition.think.budget
