"""The HTML report, opened in a real headless Chromium (installed by the test when missing)."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT
from muestra.analysis import analyze
from muestra.report.html import render
from test_analysis import frame_of, planted_store

ARTIFACTS = ROOT / "artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.geteuid() != 0:
            pytest.fail("Debian's chromium is missing; install it with `apt-get install chromium`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            check=True,
            env=env,
            capture_output=True,
        )
        path = shutil.which("chromium")
    assert path is not None
    return path


def open_page(chromium: str, page, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            *extra,
            f"file://{page}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_report_in_a_real_browser(cli, chromium, tmp_path):
    planted_store(tmp_path / "p.db", lift=0.3).close()
    page = tmp_path / "report.html"
    result = cli("report", str(tmp_path / "p.db"), "-o", str(page))
    assert result.code == 0, result.stderr
    text = page.read_text()
    assert not re.search(r'(src|href)="https?://', text) and "<link" not in text  # offline
    dom = open_page(chromium, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    bars = re.findall(
        r'class="bar" data-value="([^"]+)" data-prompt="([^"]+)" data-share="([^"]+)"', dom.stdout
    )
    shares = {(value, prompt): float(share) for value, prompt, share in bars}
    assert shares[("masculino", "A")] > 0.8 > shares[("masculino", "B")]
    # the paired comparison of the two conditions: the planted +0.3, interval excludes 0
    estimates = re.findall(
        r'class="estimate" data-by="condition" data-field="sexo" data-value="masculino" '
        r'data-difference="([^"]+)" '
        r'data-low="([^"]+)"',
        dom.stdout,
    )
    assert len(estimates) == 1 and float(estimates[0][0]) > 0.15 and float(estimates[0][1]) > 0
    for section in ("fits", "pooled", "comparisons", "field-probs", "mentions"):
        assert f'<table class="{section}">' in dom.stdout
    # goodness of fit: one row per field × prompt × condition, prompt A's sexo flagged
    fits = re.search(r'<table class="fits">.*?<tbody>(.*?)</tbody>', dom.stdout, re.S)
    assert fits and fits.group(1).count("<tr>") == 2 * 2 * 2
    assert "A (default): sexo is masculino in" in dom.stdout
    assert 'class="whisker"' in dom.stdout and 'class="hist-bar"' not in dom.stdout
    assert "prompt A makes sexo=masculino" in dom.stdout
    # the sample browser ran: both panes hold a sample with its answer and reasoning
    for side in ("a", "b"):
        pane = re.search(rf'<div id="sample-{side}">(.*?)</div>', dom.stdout, re.S)
        assert pane and 'class="answer"' in pane.group(1) and "seed" in pane.group(1)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = open_page(
        chromium,
        page,
        tmp_path,
        "--window-size=1280,2000",
        f"--screenshot={ARTIFACTS / 'report.png'}",
    )
    assert shot.returncode == 0 and (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_report_stays_small_for_10000_samples(cli, tmp_path):
    planted_store(tmp_path / "big.db", n=5000).close()
    page = tmp_path / "big.html"
    result = cli("report", str(tmp_path / "big.db"), "-o", str(page))
    assert result.code == 0, result.stderr
    assert page.stat().st_size < 500_000
    assert page.read_text().count('"prompt_id"') == 100  # 50 embedded per prompt


def test_report_escapes_answer_values_in_the_fit_table():
    records = [
        ("A", "default", "m", {"sexo": "<b>él</b>" if i < 28 else "ella"}) for i in range(30)
    ]
    frame = frame_of(records)
    run = {"name": "r", "spec_path": "s.toml", "spec_hash": "0" * 64, "created_at": "now"}
    run["muestra_version"] = "test"
    page = render(run, [], frame, analyze(frame))
    fits = re.search(r'<table class="fits">.*?</table>', page, re.S).group(0)
    assert "&lt;b&gt;él&lt;/b&gt;" in fits and "<b>" not in page
    assert "A: sexo is &lt;b&gt;él&lt;/b&gt; in 28 of 30 samples" in page  # the finding


def test_the_random_weights_warning_names_only_random_weight_models():
    """The demo's report is of the real SmolLM2 kit model: no "meaningless" there; a tiny
    kit model (random weights) beside it is named as such."""
    frame = frame_of([("A", "default", "m", {"sexo": "x"}) for _ in range(10)])
    run = {"name": "r", "spec_path": "s.toml", "spec_hash": "0" * 64, "created_at": "now",
           "muestra_version": "test"}  # fmt: skip
    real = {"label": "smol", "model_ref": "kit", "kit_preset": "smollm2-135m-instruct"}
    page = render(run, [real], frame, analyze(frame))
    assert "RANDOM" not in page and "meaningless" not in page
    assert "smol is the kit model smollm2-135m-instruct: real trained weights" in page
    tiny = {"label": "tiny", "model_ref": "kit2", "kit_preset": "tiny"}
    page = render(run, [real, tiny], frame, analyze(frame))
    assert page.count("meaningless") == 1 and "tiny is the offline kit model tiny" in page


def test_report_bars_have_distinct_colours_and_labels_that_do_not_collide():
    """Eight values get eight colours (the old palette repeated after seven); legend
    entries are spaced by their length; a long prompt name is cut to its group's width
    (whole in the tooltip); the page's lang is the analysis'."""
    values = [f"valor-largo-número-{i}" for i in range(8)]
    long_prompt = "una-descripción-de-prompt-muy-larga-que-no-cabe"
    records = [(long_prompt, "default", "m", {"clase": values[i % 8]}) for i in range(40)]
    records += [("B", "default", "m", {"clase": values[i % 3]}) for i in range(40)]
    frame = frame_of(records)
    run = {"name": "r", "spec_path": "s.toml", "spec_hash": "0" * 64, "created_at": "now",
           "muestra_version": "test"}  # fmt: skip
    page = render(run, [], frame, analyze(frame, lang="es"))
    assert page.startswith('<!doctype html><html lang="es">')
    chart = re.search(r'<svg class="chart" data-field="clase".*?</svg>', page, re.S).group(0)
    fills = re.findall(r'<rect class="bar" data-value="([^"]+)"[^>]*fill="([^"]+)"', chart)
    by_value = {value: fill for value, fill in fills}
    assert len(by_value) == 8 and len(set(by_value.values())) == 8
    legend = [int(x) for x in re.findall(r'<rect x="(\d+)" y="\d+" width="10"', chart)]
    assert all(b - a >= 14 + 6.5 * len(values[0]) for a, b in itertools.pairwise(legend))
    assert f"<title>{long_prompt} (n=40)</title>" in chart and "…</text>" in chart


def test_the_page_declares_its_language_and_puts_added_sections_before_the_analysis():
    from muestra.report.html import Section

    frame = frame_of([("A", "default", "m", {"sexo": "x" if i % 3 else "y"}) for i in range(12)])
    run = {"name": "r", "spec_path": "s.toml", "spec_hash": "0" * 64, "created_at": "now",
           "muestra_version": "test"}  # fmt: skip
    added = Section("Added <here>", [(["a"], [["<1>"]])], ["a note & more"])
    page = render(run, [], frame, analyze(frame), sections=[added])
    assert page.startswith('<!doctype html><html lang="en">')  # the page is in English
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles[:3] == ["Models", "Added &lt;here&gt;", "Budget and errors"]
    assert titles[-1] == "Samples" and "<td>&lt;1&gt;</td>" in page
    assert '<p class="note">a note &amp; more</p>' in page
