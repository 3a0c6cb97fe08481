"""`make install`'s check of the llama.cpp it installed: on x86-64, built for the portable
instruction set (LLAMA_CMAKE_ARGS=-DGGML_NATIVE=OFF: AVX2, FMA, F16C), so that a seed
samples the same bits here as on any other x86-64 machine with AVX2 (the docs' outputs,
which `make readme` compares, included). pip reuses a wheel it built earlier whatever
CMAKE_ARGS says now: a native build of an AVX-512 machine found in its cache is reported
here, with how to rebuild. `--native` (LLAMA_CMAKE_ARGS asks for a native build) only
prints what was built."""

from __future__ import annotations

import platform
import sys

from muestra.models.runtime.llamacpp_runtime import PORTABLE_X86, cpu_features


def main(argv: list[str]) -> int:
    features = cpu_features()
    print(f"    llama.cpp's CPU kernels built for: {' '.join(features) or 'no listed feature'}")
    if "--native" in argv or platform.machine().lower() not in ("x86_64", "amd64"):
        return 0
    beyond = [f for f in features if f not in PORTABLE_X86]
    if not beyond:
        return 0
    print(
        f"error: the installed llama-cpp-python was built for this machine ({' '.join(beyond)}),"
        " not for the portable set (AVX2, FMA, F16C): its samples differ in the last bits"
        " from every other machine's. pip reused a wheel it had built before; rebuild it:\n"
        "    .venv/bin/pip cache remove llama_cpp_python && rm -rf .venv && make install\n"
        'or keep it on purpose with LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON".',
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
