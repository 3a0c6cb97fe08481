"""The report's markup: escaping, tables and `Section`, the unit every part of the page is
built of.

Stored text reaches the page only escaped: `escape` for HTML, `script_json` for the JSON
inside `<script>`, which holds no `<`, `>` or `&`, so no answer can end the element or
open a comment in it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any


def escape(value: Any) -> str:
    """`value` as HTML text."""
    return html.escape(str(value))


# What could end a <script> element or open a comment in it, as JSON string escapes;
# U+2028/2029 too, which older JavaScript parsers take for line ends.
SCRIPT_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value: Any) -> str:
    """`value` as JSON safe to embed verbatim between <script> and </script>."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text.translate(SCRIPT_ESCAPES)


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass(frozen=True)
class Section:
    """One section of the report: a title, notes, then `blocks` of markup built with
    `escape` (charts, findings, notes that hold markup), then tables of plain values
    (escaped here), each with the CSS class `table_class`, then the markup `after` them.
    The report's own sections (report/sections.py) and those a layer above adds (`muestra
    eval`'s accuracies, a probe's group differences) are all built this way."""

    title: str
    tables: list[tuple[list[str], list[list[Any]]]] = dataclass_field(default_factory=list)
    notes: list[str] = dataclass_field(default_factory=list)
    blocks: list[str] = dataclass_field(default_factory=list)
    table_class: str = ""
    after: list[str] = dataclass_field(default_factory=list)  # markup after the tables

    def html(self) -> str:
        out = [f"<h2>{escape(self.title)}</h2>"]
        out += [f'<p class="note">{escape(note)}</p>' for note in self.notes]
        out += self.blocks
        out += [table(headers, rows, self.table_class) for headers, rows in self.tables]
        out += self.after
        return "".join(out)
