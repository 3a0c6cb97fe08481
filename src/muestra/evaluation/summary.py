"""Every evaluation in a store, compared where they share questions, and as report
sections (`muestra report` adds them to the HTML file)."""

from __future__ import annotations

from pathlib import Path

from muestra.evaluation.evaluate import EvalResult, PairedComparison, compare_results, read_result
from muestra.experiments.store import eval_run_ids, reading
from muestra.report.html import Section


def eval_runs(store: Path) -> list[EvalResult]:
    with reading(store) as db:
        ids = eval_run_ids(db)
    return [read_result(store, run_id) for run_id in ids]


def comparisons(results: list[EvalResult]) -> list[PairedComparison]:
    """Every pair of evaluations of the same task (paired over the questions both scored)."""
    pairs = []
    for i, a in enumerate(results):
        for b in results[i + 1 :]:
            if a.task == b.task and {s.id for s in a.items} & {s.id for s in b.items}:
                pairs.append(compare_results(a, b, a.label, b.label))
    return pairs


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


Table = tuple[list[str], list[list[object]]]
NOTE = (
    "Accuracy: share of questions answered right, Wilson 95% interval. Expected: mean "
    "probability of the right answer (exact letter probabilities), bootstrap interval "
    "over questions. Paired rows compare two scorings of the same questions: McNemar's "
    "exact test on the questions only one got right, paired bootstrap interval of the "
    "difference."
)


def report_sections(store: Path) -> list[Section]:
    """The store's evaluations as report sections (none when it holds none): accuracies,
    per category, pairs compared, timings and vote curves, each table when it has rows."""
    results = eval_runs(store)
    if not results:
        return []
    tables = [
        _accuracies(results),
        _categories(results),
        _pairs(comparisons(results)),
        _timings([r for r in results if r.timing]),
        *[_curve(r) for r in results if r.curve],
    ]
    return [Section("Evaluations", [t for t in tables if t is not None], [NOTE])]


def _accuracies(results: list[EvalResult]) -> Table:
    rows: list[list[object]] = []
    for r in results:
        a = r.accuracy
        expected = (
            "—"
            if r.expected is None
            else (f"{_pct(r.expected[0])} [{_pct(r.expected[1])}, {_pct(r.expected[2])}]")
        )
        norm = "—" if r.acc_norm is None else _pct(r.acc_norm.value)
        rows.append([r.run_id, r.task, r.label, a.total, _pct(a.value),
                     f"[{_pct(a.low)}, {_pct(a.high)}]", expected, norm])  # fmt: skip
    headers = ["run", "task", "method · model", "questions", "accuracy", "95% interval"]
    return [*headers, "expected (mean p right)", "acc_norm"], rows


def _categories(results: list[EvalResult]) -> Table | None:
    categories = sorted({c for r in results for c in r.by_category})
    if not categories:
        return None
    rows: list[list[object]] = [
        [c, *[_pct(r.by_category[c].value) if c in r.by_category else "—" for r in results]]
        for c in categories
    ]
    return ["category", *[f"{r.run_id}: {r.label}" for r in results]], rows


def _pairs(pairs: list[PairedComparison]) -> Table | None:
    if not pairs:
        return None
    headers = ["A", "B", "questions", "same answer", "accuracy A − B", "95% interval"]
    headers += ["only A right", "only B right", "McNemar p"]
    rows: list[list[object]] = [
        [p.a, p.b, p.questions, _pct(p.agreement), f"{100 * p.difference[0]:+.1f} pts",
         f"[{100 * p.difference[1]:+.1f}, {100 * p.difference[2]:+.1f}]", p.mcnemar.only_a,
         p.mcnemar.only_b, f"{p.mcnemar.p_value:.3g}"]
        for p in pairs
    ]  # fmt: skip
    return headers, rows


def _timings(timed: list[EvalResult]) -> Table | None:
    if not timed:
        return None
    headers = ["method · model", "runtime", "load s", "weights MB", "prefill tok/s"]
    headers += ["decode tok/s", "eval s"]
    rows: list[list[object]] = []
    for r in timed:
        t = r.timing
        assert t is not None
        rows.append([r.label, str(t.get("runtime", "torch")), f"{t['load_seconds']:.2f}",
                     f"{t['weights_mb']:.0f}", f"{t['prefill_tps']:.0f}",
                     f"{t['decode_tps']:.1f}", f"{t['eval_seconds']:.1f}"])  # fmt: skip
    return headers, rows


def _curve(result: EvalResult) -> Table:
    assert result.curve is not None
    rows: list[list[object]] = [
        [k, _pct(a.value), f"[{_pct(a.low)}, {_pct(a.high)}]"] for k, a in result.curve
    ]
    return ["k paths", f"{result.label}: accuracy", "95% interval"], rows
