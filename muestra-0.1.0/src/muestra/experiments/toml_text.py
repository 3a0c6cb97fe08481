"""The TOML text of a spec-shaped dict (generated specs: evaluations, comparisons, a
probe's experiment and its judge), which the store keeps and hashes.

Written here rather than with a TOML writer library: the text is part of a run's identity
(its hash decides whether a command resumes a run), so its exact shape must not change
with another package's version.
"""

from __future__ import annotations

import json
import re
from typing import Any


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for a spec-shaped dict: scalars, lists of scalars, tables, arrays of tables."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):  # JSON's escapes are TOML's, but for DEL
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} as a TOML value")

    def key_of(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def table(node: dict[str, Any], prefix: str) -> None:
        nested = []
        for key, v in node.items():
            if v is None:
                continue
            if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                nested.append((key, v))
            else:
                lines.append(f"{key_of(key)} = {value(v)}")
        for key, v in nested:
            path = f"{prefix}{key_of(key)}"
            for sub in [v] if isinstance(v, dict) else v:
                lines.append("")
                lines.append(f"[{path}]" if isinstance(v, dict) else f"[[{path}]]")
                table(sub, path + ".")

    table(data, "")
    return "\n".join(lines) + "\n"
