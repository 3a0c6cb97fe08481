"""What the analysis tells a reader (issue 46): free text summarised as text and never
tested, undefined numbers absent or explained, the comparison of paired variants as the
headline, an AUROC that cannot be computed said in words, sentences in Spanish."""

from __future__ import annotations

import numpy as np
import pytest

from muestra.analysis import analyze
from muestra.analysis.accuracy import discrimination
from muestra.analysis.columns import schema_kinds
from muestra.experiments.results import summarize
from test_analysis import frame_of

SCHEMA = {
    "$defs": {"Sexo": {"enum": ["masculino", "femenino"], "type": "string"}},
    "properties": {
        "nombre": {"type": "string"},
        "sexo": {"$ref": "#/$defs/Sexo"},
        "edad": {"type": "integer"},
        "ficha": {"type": "object", "properties": {"nota": {"type": "string"},
                                                   "activo": {"type": "boolean"}}},
    },
}  # fmt: skip


def test_schema_kinds_follow_refs_and_nested_objects():
    assert schema_kinds(SCHEMA) == {
        "nombre": "text", "sexo": "categorical", "edad": "numeric",
        "ficha.nota": "text", "ficha.activo": "categorical",
    }  # fmt: skip


def _names(n: int = 40):
    """Two prompts whose `nombre` takes only three values (so counting alone would call it
    a category) and differs by prompt: a χ² by prompt would be 'significant'."""
    rng = np.random.default_rng(0)
    records = []
    for prompt, names in (("A", ["Ana", "Eva", "Sol"]), ("B", ["Luis", "Juan", "Tomás"])):
        for _ in range(n):
            answer = {"nombre": str(rng.choice(names)),
                      "sexo": str(rng.choice(["masculino", "femenino"]))}  # fmt: skip
            records.append((prompt, "default", "m", answer))
    return frame_of(records)


def test_a_string_without_enum_is_free_text_summarised_and_never_tested():
    frame = _names()
    without = analyze(frame)  # no schema: three names in 40 samples look like a category
    assert any(t.field == "nombre" for t in without.tests)
    result = analyze(frame, schema=SCHEMA)
    assert [t.field for t in result.tests] == ["sexo"]
    assert not [d for d in result.distributions if d.field == "nombre"]
    assert not [f for f in result.fits if f.field == "nombre"]
    texts = {t.group: t for t in result.text}
    assert set(texts) == {"A", "B", "all"} and texts["A"].n == 40
    assert texts["all"].distinct_share == pytest.approx(6 / 80)
    assert texts["A"].mean_chars == pytest.approx(3.0)
    assert texts["A"].top_words.split(" (")[0] in {"ana", "eva", "sol"}
    assert any("nombre: free text" in n for n in result.notes)
    # `muestra summary` follows the same schema
    fields = summarize(frame, schema=SCHEMA)["groups"]["A"]["fields"]
    assert fields["nombre"]["kind"] == "text" and fields["sexo"]["kind"] == "categorical"
    assert summarize(frame)["groups"]["A"]["fields"]["nombre"]["kind"] == "categorical"


def _vecinos(share_a: float, share_b: float, n: int = 60, groups: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    frame = frame_of([
        (f"g{g}_{v}", "default", "m",
         {"sexo": "masculino" if rng.random() < share else "femenino"})
        for g in range(groups) for v, share in (("vecino", share_a), ("vecina", share_b))
        for _ in range(n)
    ])  # fmt: skip
    frame["group"] = frame["prompt_id"].str.split("_").str[0]
    frame["variant"] = frame["prompt_id"].str.split("_").str[1]
    frame["sample"] = frame.groupby("prompt_id").cumcount()
    return frame


def test_the_headline_of_paired_variants_is_their_comparison_not_a_fit_to_uniform():
    """vecino vs vecina with the same 88 % masculino: every prompt is far from the
    uniform reference (significant fits), but the finding is that the variants do not
    differ; the fits are `other_findings`."""
    result = analyze(_vecinos(0.88, 0.88))
    assert len(result.findings) == 1, result.findings
    assert result.findings[0].startswith("no difference between vecina and vecino detected")
    assert all("reference" in f for f in result.other_findings) and result.other_findings
    headline = next(t for t in result.tests if t.headline)
    assert headline.by == "variant" and headline.p_holm > 0.05
    pairs = [c for c in result.comparisons if c.by == "variant"]
    assert {c.value for c in pairs} == {"masculino", "femenino"} and pairs[0].prompts == 3
    differ = analyze(_vecinos(0.9, 0.5), lang="es")
    assert differ.findings[0].startswith("vecina y vecino difieren: sexo=")
    # three groups are too few for a paired-bootstrap interval: the sentence says so
    assert "en 3 grupo(s): muy pocos grupos para un intervalo" in differ.findings[0]
    six = analyze(_vecinos(0.9, 0.5, n=30, groups=6), lang="es")
    assert "IC 95 % de" in six.findings[0] and "emparejado en 6 grupo(s)" in six.findings[0]


def test_an_exact_probability_and_a_single_sample_have_no_interval():
    frame = frame_of([("A", "default", "m", {"sexo": "masculino"}) for _ in range(5)]
                     + [("B", "default", "m", {"sexo": "femenino"})])  # fmt: skip
    frame["field_probs"] = [{"sexo": {"masculino": 0.7, "femenino": 0.3}}] * 6
    result = analyze(frame, lang="es")
    rows = {(f.group, f.value): f for f in result.field_probs}
    for group in ("A", "B"):
        row = rows[(group, "masculino")]
        assert row.low is None and row.high is None and row.narrower is None
        assert row.mean_probability == pytest.approx(0.7)
    assert any("probabilidad es exacta" in n for n in result.notes)
    assert any(n.startswith("B: una sola muestra") for n in result.notes)


def test_an_auroc_without_right_answers_is_explained_in_words():
    from muestra.report import plots

    none_right = discrimination([0.9, 0.5, 0.3], [False, False, False])
    assert none_right.auroc is None and none_right.low is None
    text = none_right.explain("es")
    assert "nan" not in text.lower() and "todas las respuestas son incorrectas (3)" in text
    assert "every answer is wrong" in str(none_right)
    title = plots.calibration(none_right, lang="es").axes[0].get_title()
    assert "nan" not in title.lower() and title.startswith("AUROC no calculable")
