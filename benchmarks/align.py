"""Reward models and DPO on the real model (SmolLM2-135M-Instruct, fp32), on this CPU.

Each training command runs as its own process (`muestra reward train`, `muestra align
dpo`), so its wall time and peak resident memory (`wait4`'s ru_maxrss) are its own.
The pairs and settings are the worked example's (examples/align-characters.sh):
the character experiment on the real model, female (chosen) against male (rejected)
characters of the same description, reasoning included. `reward score` is timed on that
store (samples per second).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _measured(args: list[str]) -> dict[str, Any]:
    """Run `muestra ARGS` in its own process: wall seconds, peak RSS (MiB), stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "muestra", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"muestra {' '.join(args)} failed ({proc.returncode})")
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stdout": out.strip(),
    }


def bench_align(kit: Path, samples: int = 50, per_prompt: int = 8) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="muestra-bench-align-"))
    spec = str(ROOT / "examples" / "characters.toml")
    store, pairs = work / "audit.db", work / "pairs.jsonl"
    run = _measured(
        ["run", spec, "--model", str(kit), "--samples", str(samples), "--out", str(store)]
    )
    made = _measured(
        ["pairs", str(store), "--chosen", 'gender == "female"', "--rejected",
         'gender == "male"', "--max-per-prompt", str(per_prompt), "--out", str(pairs),
         "--json"]
    )  # fmt: skip
    n_pairs = json.loads(made["stdout"])["pairs"]
    reward = _measured(
        ["reward", "train", "--base", str(kit), "--data", str(pairs), "--out",
         str(work / "reward"), "--epochs", "2", "--lr", "5e-5", "--train-layers", "8",
         "--eval-fraction", "0.25", "--json"]
    )  # fmt: skip
    dpo = _measured(
        ["align", "dpo", "--base", str(kit), "--data", str(pairs), "--out",
         str(work / "aligned"), "--epochs", "2", "--lr", "5e-5", "--train-layers", "8",
         "--eval-fraction", "0.25", "--json"]
    )  # fmt: skip
    score = _measured(["reward", "score", str(store), "--reward", str(work / "reward")])
    n_samples = 2 * samples
    return {
        "pairs": n_pairs,
        "samples": n_samples,
        "audit_seconds": run["seconds"],
        "reward_train": {
            "seconds": reward["seconds"],
            "peak_rss_mib": reward["peak_rss_mib"],
            "metrics": json.loads(reward["stdout"]),
        },
        "dpo": {
            "seconds": dpo["seconds"],
            "peak_rss_mib": dpo["peak_rss_mib"],
            "metrics": json.loads(dpo["stdout"]),
        },
        "reward_score": {
            "seconds": score["seconds"],
            "samples_per_s": n_samples / score["seconds"],
            "peak_rss_mib": score["peak_rss_mib"],
        },
    }
