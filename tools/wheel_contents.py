"""`python tools/wheel_contents.py WHEEL`: does the wheel hold the whole package?

Every file of src/muestra that git tracks — modules, chat templates, data files, probes,
lexicons, question sets, py.typed — must be in the wheel at the same path, and the wheel's
metadata must declare the extras a user installs (`llamacpp`, `models`). Prints what is
missing and exits 1, else one line of counts. (`make package-test` runs it.)
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_package_files() -> set[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "src/muestra"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return {name.removeprefix("src/") for name in listed.split("\0") if name}


def main(wheel: str) -> int:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(metadata).decode())
    missing = sorted(tracked_package_files() - names)
    extras = set(message.get_all("Provides-Extra") or [])
    problems = [f"not in the wheel: {name}" for name in missing]
    problems += [f"extra not declared: {e}" for e in sorted({"llamacpp", "models"} - extras)]
    for problem in problems:
        print(problem)
    if problems:
        print("add the files to [tool.setuptools.package-data] in pyproject.toml")
        return 1
    data = [n for n in names if n.startswith("muestra/") and not n.endswith(".py")]
    print(f"    {len(names)} files, {len(data)} of them data; extras: {', '.join(sorted(extras))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
