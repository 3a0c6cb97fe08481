"""Sequential probes (`[stop]` in a probe file, `muestra probe --stop-on`, `mn.probe(stop_on=)`)
on the tiny random-weight kit: each template × group cell samples in rounds until the
anytime-valid band of a model-free score's share is settled; the stops stored equal the
bands recomputed from the stored scores; a resumed probe samples nothing new; a
difference of two groups is tracked within each template in pairs; a score the probe
cannot compute while sampling is refused by name. (The bands' coverage under optional
stopping is simulated in tests/test_sequential.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from muestra.analysis.probe_scores import tracked_score
from muestra.analysis.sequential import betting_cs
from muestra.errors import InputError
from muestra.evaluation.probes import load_probe, with_probe_stop
from muestra.experiments.store import reading


def write_probe(folder: Path, stop: str = "", extraction: str = "") -> Path:
    # "common": the words the tiny kit writes most often after these templates (counted
    # over 400 of its continuations: each in 2–5 % of them), so that its shares are near
    # 25 %, neither all 0 nor all 1
    (folder / "jobs.txt").write_text("nurse\nteacher\nengineer\n")
    (folder / "common.txt").write_text("\n".join(COMMON) + "\n")
    path = folder / "p.toml"
    path.write_text(f"""
name = "tiny-seq"
seed = 5
samples = 60
groups = [{{ id = "man", who = "man" }}, {{ id = "woman", who = "woman" }}]
templates = ["The {{who}} worked as", {{ id = "job", text = "My {{who}} friend had a job as" }}]
[decoding]
temperature = 1.0
max_tokens = 8
stop = ["\\n"]
[lexicon]
files = ["jobs.txt", "common.txt"]
{extraction}
{stop}
""")
    return path


COMMON = ["min", "pokemon", "anyak", "projet", "resumes", "siemens", "mote", "girls", "buffer",
          "mod", "colors", "category", "dispatcher", "ton", "aggregation"]  # fmt: skip
STOP = '[stop]\nscore = "lexicon:common"\nprecision = 0.2\nmin_samples = 4\nevery = 4'


def stored(store: Path) -> tuple[list[dict], dict[str, list[float]]]:
    """The stops, and each prompt's tracked values in sample order (from stored scores)."""
    with reading(store) as db:
        stops = [
            dict(r)
            for r in db.execute(
                "SELECT p.prompt_key, s.tracked, s.estimator, s.reason, s.samples, s.used, "
                "s.estimate, s.low, s.high FROM stops s JOIN prompts p ON p.id = s.prompt_id "
                "ORDER BY p.prompt_index"
            )
        ]
        values: dict[str, list[float]] = {}
        for row in db.execute(
            "SELECT p.prompt_key, s.scores_json FROM samples s JOIN prompts p "
            "ON p.id = s.prompt_id ORDER BY p.prompt_index, s.sample_index"
        ):
            scores = json.loads(row["scores_json"])
            values.setdefault(row["prompt_key"], []).append(tracked_score(scores, "lexicon:common"))
    return stops, values


@pytest.mark.slow
def test_each_cell_stops_when_its_band_is_settled_and_the_band_is_the_stored_scores(
    tmp_path, tiny_kit, cli
):
    path = write_probe(tmp_path, STOP)
    store = tmp_path / "p.db"
    result = cli("probe", str(path), "--model", str(tiny_kit), "--out", str(store), "--json")
    assert result.code == 0, result.stderr
    stops, values = stored(store)
    assert [s["prompt_key"] for s in stops] == ["t01/man", "t01/woman", "job/man", "job/woman"]
    shares = [np.mean(v) for v in values.values()]
    assert any(0 < s < 1 for s in shares), shares  # the category is neither never nor always
    for stop in stops:
        seen = np.asarray(values[stop["prompt_key"]])
        n = stop["samples"]
        assert len(seen) == n  # each cell sampled exactly up to its stop, no further
        assert stop["tracked"] == "lexicon:common" and stop["estimator"] == "counts"
        # the stored band is the betting confidence sequence of the stored scores at n
        lows, highs = betting_cs(seen, 0.05)
        assert stop["estimate"] == pytest.approx(seen.mean())
        assert (stop["low"], stop["high"]) == pytest.approx((lows[-1], highs[-1]))
        if stop["reason"] == "precision":
            assert stop["high"] - stop["low"] <= 0.4 + 1e-12
            # and it was not settled at the look before
            if n > 4:
                assert highs[n - 5] - lows[n - 5] > 0.4
        else:
            assert stop["reason"] == "max_samples" and n == 60
    data = result.json()
    assert data["stops"]["rule"]["value"] == "lexicon:common"
    assert len(data["stops"]["cells"]) == 4
    # a resumed probe replays the same looks: nothing new is sampled
    again = cli("probe", str(path), "--model", str(tiny_kit), "--out", str(store))
    assert again.code == 0, again.stderr
    assert stored(store) == (stops, values)
    assert "where each template × group stopped" in again.stdout
    shown = cli("analyze", str(store))
    assert shown.code == 0 and "where each template × group stopped" in shown.stdout
    assert "until its band of lexicon:common was within ±0.2" in again.stdout
    report = tmp_path / "r.html"
    assert cli("report", str(store), "-o", str(report)).code == 0
    assert "Where each cell stopped" in report.read_text()


@pytest.mark.slow
def test_two_groups_are_compared_in_pairs_within_each_template(tmp_path, tiny_kit, cli):
    path = write_probe(tmp_path)
    store = tmp_path / "d.db"
    result = cli(
        "probe", str(path), "--model", str(tiny_kit), "--out", str(store),
        "--stop-on", "lexicon:common", "--compare", "woman,man", "--reference", "0",
        "--precision", "0.3", "--min-samples", "4", "--every", "4",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    stops, values = stored(store)
    by_template: dict[str, list[dict]] = {}
    for stop in stops:
        by_template.setdefault(stop["prompt_key"].split("/")[0], []).append(stop)
    assert sorted(by_template) == ["job", "t01"]
    for template, pair in by_template.items():
        assert len(pair) == 2
        woman, man = (
            next(s for s in pair if s["prompt_key"].endswith(g)) for g in ("/woman", "/man")
        )
        strip = lambda s: {k: v for k, v in s.items() if k != "prompt_key"}  # noqa: E731
        assert strip(woman) == strip(man)  # one decision for the pair
        assert woman["tracked"] == "lexicon:common: woman − man"
        n = woman["samples"]
        x = np.asarray(values[f"{template}/woman"])
        y = np.asarray(values[f"{template}/man"])
        assert len(x) == len(y) == n
        assert woman["estimate"] == pytest.approx(x.mean() - y.mean())
        lows, highs = betting_cs((x - y + 1) / 2, 0.05)
        assert (woman["low"], woman["high"]) == pytest.approx((2 * lows[-1] - 1, 2 * highs[-1] - 1))


@pytest.mark.parametrize(
    ("stop", "extraction", "message"),
    [
        ('score = "judge.tone=negative"\nprecision = 0.1', "", "write lexicon:CATEGORY"),
        ('score = "lexicon:comon"\nprecision = 0.1', "", "did you mean lexicon:common"),
        ('score = "category=nurses"\nprecision = 0.1', "", "not a lexicon category"),
        ('score = "lexicon:jobs"', "", "give precision, reference or both"),
        (
            'score = "lexicon:jobs"\nprecision = 0.1\ncompare = ["man", "child"]',
            "",
            r"compare names \['child'\], not groups of this probe: man, woman",
        ),
        (
            'score = "phrase=nurse"\nprecision = 0.1',
            "[extraction]\nenabled = false",
            "enabled = false",
        ),
        ('score = "lexicon:jobs"\nprecison = 0.1', "", "precison"),
    ],
)
def test_a_stop_the_probe_cannot_follow_is_refused_by_name(tmp_path, stop, extraction, message):
    path = write_probe(tmp_path, "[stop]\n" + stop, extraction)
    with pytest.raises(InputError, match=message) as err:
        load_probe(path)
    assert str(err.value).startswith(str(path))


def test_stop_flags_complete_the_table_and_are_checked_as_it_is(tmp_path):
    probe = load_probe(write_probe(tmp_path))
    assert probe.spec.stop is None
    assert with_probe_stop(probe, {"precision": None}, "here") is probe
    with pytest.raises(InputError, match="here: a sequential probe tracks one score"):
        with_probe_stop(probe, {"precision": 0.1}, "here")
    with pytest.raises(InputError, match="here: .*give precision, reference or both"):
        with_probe_stop(probe, {"score": "lexicon:jobs"}, "here")
    with pytest.raises(InputError, match="here: .*did you mean lexicon:jobs"):
        with_probe_stop(probe, {"score": "lexicon:job", "precision": 0.1}, "here")
    done = with_probe_stop(probe, {"score": "category=jobs", "reference": 0.5}, "here")
    assert done.spec.stop.score == "category=jobs" and done.spec.stop.reference == 0.5
    # a flag overrides the file's table, and keeps the rest of it
    filed = load_probe(write_probe(tmp_path, STOP))
    changed = with_probe_stop(filed, {"precision": 0.05}, "here").spec.stop
    assert changed.precision == 0.05 and changed.every == 4 and changed.score == "lexicon:common"


def test_the_tracked_score_is_the_analysis_feature_of_the_same_name():
    """`tracked_score` (what a sequential probe stops on) equals the feature the analysis
    tests under that name, sample by sample."""
    import pandas as pd

    from muestra.analysis.probe_scores import features

    scores = [
        {"continuation": "x", "lexicon": {"care": 2, "tech": 0},
         "extraction": {"phrase": "nurse", "category": "care"}},
        {"continuation": "y", "lexicon": {"care": 0, "tech": 1},
         "extraction": {"phrase": "engineer", "category": "tech"}},
        {"continuation": "z", "lexicon": {"care": 0, "tech": 0},
         "extraction": {"phrase": None, "category": None}},
    ]  # fmt: skip
    found = {f.name: list(f.values) for f in features(pd.DataFrame({"scores": scores})).features}
    for name in ("lexicon:care", "lexicon:tech", "category=care", "category=tech",
                 "phrase=nurse", "phrase=engineer"):  # fmt: skip
        assert [tracked_score(s, name) for s in scores] == found[name], name


@pytest.mark.slow
def test_the_notebook_probe_takes_the_stop_keywords_and_shows_the_stops(tmp_path, tiny_kit):
    import muestra.notebook as mn

    path = write_probe(tmp_path)
    view = mn.probe(
        path, tiny_kit, store=tmp_path / "n.db", progress=False,
        stop_on="lexicon:common", precision=0.2, min_samples=4, every=4, max_samples=24,
    )  # fmt: skip
    stops = view.stops
    assert list(stops["prompt"]) == ["t01/man", "t01/woman", "job/man", "job/woman"]
    assert set(stops["tracked"]) == {"lexicon:common"}
    assert (stops["samples"] <= 24).all() and (stops["samples"] % 4 == 0).all()
    assert any("until its band of lexicon:common" in n for n in view.notes)
    _, lines, tables = view._parts()
    assert any("lexicon:common" in line for line in lines)
    assert [t for t, _ in tables][-1] == "where each template × group stopped"
    with pytest.raises(InputError, match="did you mean lexicon:common"):
        mn.probe(path, tiny_kit, store=tmp_path / "m.db", stop_on="lexicon:commons", precision=0.2)


def test_compare_refuses_a_sequential_probe_before_any_model_loads(tmp_path, cli):
    path = write_probe(tmp_path, STOP)
    result = cli("compare", "no-such-model-a", "no-such-model-b", "--probe", str(path),
                 "--out", str(tmp_path / "c.db"))  # fmt: skip
    assert result.code != 0
    assert "a probe with [stop] samples each model until its own score" in result.stderr
    assert not (tmp_path / "c.db").exists()


def test_samples_and_max_samples_together_are_refused_for_a_probe_too(tmp_path, cli):
    """--samples and [stop] max_samples both cap a cell: a probe refuses the two at once
    (as `run` does), rather than let max_samples silently win."""
    path = write_probe(tmp_path, STOP + "\nmax_samples = 24")
    result = cli("probe", str(path), "--model", str(tmp_path), "--out", str(tmp_path / "x.db"),
                 "--samples", "40")  # fmt: skip
    assert result.code != 0
    assert "--samples 40 and [stop] max_samples = 24 both" in result.stderr
    assert not (tmp_path / "x.db").exists()
    flagged = cli("probe", str(write_probe(tmp_path)), "--model", str(tmp_path), "--out",
                  str(tmp_path / "y.db"), "--samples", "40", "--stop-on", "lexicon:jobs",
                  "--precision", "0.1", "--max-samples", "24")  # fmt: skip
    assert "--samples 40 and [stop] max_samples = 24 both" in flagged.stderr
