"""Execute the notebooks top to bottom and keep the executed copies (for the docs).

    python notebooks/execute.py --scale full --accept-gemma-terms --out docs/cuadernos
    python notebooks/execute.py --scale test --out /tmp/cuadernos 000 004

Each notebook runs in its own kernel from the `notebooks/` folder, one at a time, with
`MUESTRA_NB_ESCALA` (`completa` or `prueba`) and its work (stores, trained models) under
`--work` (kept: a rerun resumes the stored samples instead of drawing them again);
`--accept-gemma-terms` builds the Gemma 3 270M kit (you accept the Gemma Terms of Use,
https://ai.google.dev/gemma/terms) and hands it to the notebooks through
`MUESTRA_NB_GEMMA`, as if their `ACEPTO_TERMINOS_GEMMA` were True. Written to `--out`:
each executed notebook (`NNN_name.ipynb`), every figure it drew as a PNG
(`figures/NNN-cellCC-K.png`, to look at) and `times.json` (seconds per notebook). The
run stops at the first cell that raises. `problems(nb)` lists what a reader should not
see in an executed notebook (errors, stderr noise, progress bars stuck at 0 %, a bare
number printed by a cell, `nan`); the tests assert it is empty.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCALES = {"full": "completa", "test": "prueba"}
WORK = Path("~/.cache/muestra/notebooks-work")  # outside the docs: stores and models
NOISE = ("LOAD REPORT", "Loading weights", "{'loss'", "'train_runtime'", "0%|")
# a number that is not one, as Python prints it ("nan", "inf"); pandas' "NaN" for a
# missing cell (an `error` column without error) is not flagged
NAN = re.compile(r"\bnan\b|\binf\b")
BARE_NUMBER = re.compile(r"^\d+$")


def execute(
    path: Path, env: dict[str, str], timeout: int = 3600, failed: Path | None = None
) -> Any:
    """The notebook at `path`, executed in a fresh kernel with `env` added to its
    environment (the kernel inherits this process's). A cell that raises stops it; the
    notebook as far as it ran is written to `failed` first, when given."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    except CellExecutionError:
        if failed is not None:
            nbformat.write(nb, failed)
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def _texts(output: Any) -> list[str]:
    if output.output_type == "stream":
        return [output.text]
    data = output.get("data", {})
    return [data["text/plain"]] if "text/plain" in data else []


def problems(nb: Any) -> list[str]:
    """What a reader should not see in an executed notebook, one line per finding."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            where = f"cell {index}"
            if output.output_type == "error":
                found.append(f"{where}: {output.ename}: {output.evalue}")
            if output.output_type == "stream" and output.name == "stderr":
                found += [f"{where}: stderr shows {m!r}" for m in NOISE if m in output.text]
            for text in _texts(output):
                if NAN.search(text):
                    found.append(f"{where}: prints nan: {text[:120]!r}")
                if output.output_type == "execute_result" and BARE_NUMBER.match(text.strip()):
                    found.append(f"{where}: prints a bare number {text.strip()}")
                if "0%|" in text:
                    found.append(f"{where}: a progress bar left at 0 %")
    return found


def figures(nb: Any) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of every figure the notebook drew."""
    found = []
    for index, cell in enumerate(nb.cells):
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", [])
                if "image/png" in o.get("data", {})]  # fmt: skip
        found += [(f"cell{index:02d}-{k}", base64.b64decode(png)) for k, png in enumerate(pngs)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="numbers (000 …) to run; default: all")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--out", type=Path, required=True, help="folder for the copies")
    parser.add_argument("--work", type=Path, default=WORK,
                        help=f"stores and trained models; a rerun resumes them (default: {WORK})")
    parser.add_argument(
        "--accept-gemma-terms",
        action="store_true",
        help="build Gemma 3 270M: you accept https://ai.google.dev/gemma/terms",
    )
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per cell")
    args = parser.parse_args(argv)
    import nbformat

    paths = sorted(HERE.glob("[0-9][0-9][0-9]_*.ipynb"))
    if args.notebooks:
        paths = [p for p in paths if p.name[:3] in args.notebooks]
    env = {"MUESTRA_NB_ESCALA": SCALES[args.scale],
           # one folder per scale: a store refuses a spec with other sizes
           "MUESTRA_NB_TRABAJO": str((args.work.expanduser() / args.scale).resolve())}  # fmt: skip
    if args.accept_gemma_terms:
        from muestra.models.kit import ensure_kit

        env["MUESTRA_NB_GEMMA"] = str(ensure_kit("gemma-3-270m", accept_terms=True))
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    for path in paths:
        started = time.perf_counter()
        print(f"{path.name}: running at {args.scale} scale …", file=sys.stderr, flush=True)
        nb = execute(path, env, args.timeout, args.out / f"{path.stem}.failed.ipynb")
        times[path.stem] = round(time.perf_counter() - started, 1)
        nbformat.write(nb, args.out / path.name)
        for name, png in figures(nb):
            (args.out / "figures" / f"{path.name[:3]}-{name}.png").write_bytes(png)
        found = problems(nb)
        print(f"{path.name}: {times[path.stem]:.0f} s" + "".join(f"\n  {p}" for p in found),
              file=sys.stderr, flush=True)  # fmt: skip
        (args.out / "times.json").write_text(json.dumps(times, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
