"""llama.cpp's own programs, as peers for the benchmarks and the remote backend's tests.

`python -m benchmarks.peers` (`make peers`, which `make test-long` and `make bench` run)
builds `llama-server`, `llama-batched-bench` and `llama-quantize` (benchmarks/shapes.py)
once from the llama.cpp source vendored in the installed llama-cpp-python's sdist
(downloaded from PyPI), so they are the same llama.cpp muestra's runtime computes with;
cached under muestra's cache folder (~5 min on 2 cores the first time; then nothing).
Prints the folder of the programs.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def _cache() -> Path:
    from muestra.paths import cache_dir

    return cache_dir() / "llama.cpp"


def build_peers() -> dict[str, Path]:
    """`llama-batched-bench`, `llama-server` and `llama-quantize` of the installed
    llama-cpp-python's vendored llama.cpp, built once (cmake, ~5 min on 2 cores), cached."""
    from filelock import FileLock

    version = importlib.metadata.version("llama-cpp-python")
    folder = _cache() / version
    names = ("llama-batched-bench", "llama-server", "llama-quantize")
    binaries = {name: folder / "build" / "bin" / name for name in names}
    if all(path.is_file() for path in binaries.values()):
        return binaries
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "build.lock"):  # test workers may ask at once
        if not all(path.is_file() for path in binaries.values()):
            _build(version, folder)
    return binaries


def _build(version: str, folder: Path) -> None:
    source = folder / "source"
    if not source.is_dir():
        with tempfile.TemporaryDirectory() as download:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", download],
                check=True,
            )  # fmt: skip
            (sdist,) = Path(download).glob("*.tar.gz")
            with tarfile.open(sdist) as archive:
                archive.extractall(download, filter="data")
            (unpacked,) = (p for p in Path(download).iterdir() if p.is_dir())
            shutil.move(str(unpacked / "vendor" / "llama.cpp"), source)
    build = folder / "build"
    log = folder / "build.log"
    print(f"building llama-server and llama-batched-bench once (~5 min; log: {log}) …")
    with open(log, "w") as handle:
        for command in (
            ["cmake", "-S", str(source), "-B", str(build), "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DCMAKE_BUILD_TYPE=Release",
             # the instruction set `make install` builds llama-cpp-python for (Makefile)
             "-DGGML_NATIVE=OFF"],
            ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2),
             "--target", "llama-batched-bench", "llama-server", "llama-quantize"],
        ):  # fmt: skip
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(
                    f"{tail}\nbuilding llama.cpp's programs failed (log: {log}); "
                    "they need cmake and a C++ compiler"
                )


if __name__ == "__main__":
    print(build_peers()["llama-server"].parent)
