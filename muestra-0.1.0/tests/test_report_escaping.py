"""Stored text cannot break the report page: markup in any field of a sample stays text.

An answer holding `<!--<script>` once hid every later sample: inside a <script> element
that sequence switches the HTML parser into a state where `</script>` no longer ends it.
Per the HTML standard, script data leaves its plain state only at a `<`; so a page whose
embedded JSON holds no `<` ends that element at the first `</script`, and the JSON read
from there is what the browser reads.
"""

from __future__ import annotations

import json
import re

from muestra.analysis import analyze
from muestra.report.html import render
from test_analysis import frame_of

HOSTILE = ["<!--<script>", "</script>", "<script>alert(1)</script>", "a & b > c", "x\u2028y"]


def hostile_frame():
    records = []
    for i in range(24):
        mark = HOSTILE[i % len(HOSTILE)]
        prompt = f"P{i % 2}{mark}"
        answer = {"sexo": f"{mark}masculino" if i % 3 else "femenino", "nombre": f"n{mark}"}
        records.append((prompt, f"c{HOSTILE[i % 2]}", f"m{HOSTILE[2]}", answer))
    frame = frame_of(records)
    frame["answer_text"] = [f'{{"sexo": "{m}"}}{HOSTILE[i % 5]}' for i, m in enumerate(frame.sexo)]
    frame["reasoning"] = [f"pienso {HOSTILE[(i + 1) % 5]} luego" for i in range(len(frame))]
    frame["finish_reason"] = f"stop{HOSTILE[0]}"
    frame.loc[5, "error"] = f"broken {HOSTILE[1]}"
    return frame


def embedded_samples(page: str) -> tuple[str, list[dict]]:
    opening = '<script id="samples-data" type="application/json">'
    start = page.index(opening) + len(opening)
    end = page.lower().index("</script", start)
    return page[start:end], json.loads(page[start:end])


def test_markup_in_every_text_field_stays_inside_its_sample():
    frame = hostile_frame()
    run = {"name": "r</title><!--", "spec_path": "s<script>.toml", "spec_hash": "0" * 64}
    run |= {"created_at": "now", "muestra_version": "test"}
    page = render(run, [{"label": "m<!--", "model_ref": "<script>"}], frame, analyze(frame))
    raw, samples = embedded_samples(page)
    # nothing in the embedded JSON can end the element or open a comment in it
    assert not re.search(r"[<>&\u2028\u2029]", raw), raw[:300]
    assert len(samples) == len(frame)
    for sample, (_, row) in zip(samples, frame.iterrows(), strict=True):
        for column in ("prompt_id", "condition", "model", "answer_text", "reasoning"):
            assert sample[column] == row[column]
        assert sample["finish_reason"] == row["finish_reason"]
        assert sample["error"] == (row["error"] if isinstance(row["error"], str) else None)
    # outside the JSON every stored string is HTML-escaped: the page's own tags only
    assert "<!--" not in page
    assert page.count("<script") == 2 and page.lower().count("</script") == 2
    assert "&lt;!--&lt;script&gt;masculino" in page  # a field value, in the tables and charts
    assert page.endswith("</script></body></html>")
