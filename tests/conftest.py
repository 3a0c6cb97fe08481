"""Shared fixtures: kit folders built once per test session, and a CLI runner.

The kits are built fresh into a temporary folder (the build itself is under test),
unless MUESTRA_TEST_KITS points at a folder to reuse between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "seeds"


@pytest.fixture(scope="session")
def kits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reuse = os.environ.get("MUESTRA_TEST_KITS")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("kits")


def _kit(kits_root: Path, preset: str) -> Path:
    from muestra.kit import ensure_kit

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
    """Run `muestra ARGS…` in a subprocess, as a user types it."""
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


@pytest.fixture
def cli():
    return run_cli
