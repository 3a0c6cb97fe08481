"""Long runs say where they are (issue 42, item 3): the rate/ETA tracker on a fake
clock, the server's `/health` numbers after a request, and `muestra run`'s final line."""

from __future__ import annotations

import re

import pytest

from muestra.engine.progress import RateTracker, progress_text, resident_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_tracker_takes_rates_over_the_recent_window_and_the_eta_from_them():
    clock = Clock()
    tracker = RateTracker(total=100, window=10.0, clock=clock)
    assert tracker.rates() == (0.0, 0.0) and tracker.eta() is None  # nothing yet
    for _ in range(4):  # 2 rows and 50 tokens a second for 4 s
        clock.now += 1
        tracker.add(rows=2, tokens=50)
    assert tracker.rates() == pytest.approx((2.0, 50.0))
    assert tracker.eta() == pytest.approx(92 / 2.0)
    clock.now += 20  # idle past the window: the rate falls to zero, no ETA from it
    assert tracker.rates() == (0.0, 0.0) and tracker.eta() is None
    clock.now += 1
    tracker.add(rows=10, tokens=100)  # one burst: over the 10 s window
    assert tracker.rates() == pytest.approx((1.0, 10.0))
    assert tracker.eta() == pytest.approx(82 / 1.0)
    assert tracker.done == 18 and tracker.tokens == 300
    tracker.add(rows=82)
    assert tracker.eta() == 0.0


def test_the_text_shows_what_is_known():
    assert progress_text(340.4, 65, 812 * 2**20) == "340 tok/s · ETA 1m05s · RSS 812.0 MiB"
    assert progress_text(0, None, None) == "0 tok/s"
    rss = resident_bytes()
    assert rss is not None and 10 * 2**20 < rss < 64 * 2**30  # this test process


def test_health_carries_throughput_and_memory_after_a_request(tiny_kit):
    from test_server import in_process

    with in_process(tiny_kit, "tiny") as http:
        before = http.get("/health").json()
        assert before["rows_done"] == 0 and before["tokens_per_second"] == 0
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 20, "n": 3, "seed": 1, "temperature": 1.0}  # fmt: skip
        reply = http.post("/v1/chat/completions", json=body).json()
        health = http.get("/health").json()
    generated = reply["usage"]["completion_tokens"]
    assert health["rows_done"] == 3
    assert health["tokens_generated"] >= generated > 0  # forced tokens count too
    assert health["tokens_per_second"] > 0
    window = health["rate_window_seconds"]
    assert health["tokens_per_second"] >= health["tokens_generated"] / window - 1e-6
    assert health["rows_running"] == 0 and health["rows_waiting"] == 0
    assert health["queue_eta_seconds"] == 0
    assert 10 * 2**20 < health["rss_bytes"] <= health["peak_rss_bytes"]
    assert health["kv_cells"] is None  # the torch runtime has no fixed cache


def test_muestra_run_ends_with_its_speed_and_memory(cli, tiny_kit, tmp_path):
    from test_experiments import write_spec

    spec = write_spec(tmp_path, tiny_kit)
    result = cli("run", str(spec), "--out", str(tmp_path / "out.db"), "--samples", "2")
    assert result.code == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("done:"))
    found = re.search(r"\((\d+) tok/s, [\d.]+ samples/s, peak RSS ([\d.]+) (MiB|GiB)\)", line)
    assert found, line
    assert int(found[1]) > 0 and float(found[2]) > 0
