"""The HTML report, opened in a real headless Chromium (installed by the test when missing)."""

from __future__ import annotations

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
        r'class="estimate" data-field="sexo" data-value="masculino" data-difference="([^"]+)" '
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
