"""Time to a finding: seed 000's question sampled until it is settled, on the real models
(llama.cpp runtime), against the fixed n that gives the same width by counting.

For each model (SmolLM2-135M-Instruct: examples/characters.toml, English; Gemma 3 270M:
examples/personajes-gemma.toml, Spanish, the Gemma Terms of Use accepted with
--accept-gemma-terms) and each prompt cell, with the answer drawn at temperature 1 (so that
field_probs estimate the share, Rao–Blackwell):

1. a sequential run "±precision": each cell stops once its anytime-valid 95% band of the
   tracked share (male / masculino) is within ± precision (field_probs estimator), and the
   same run counting answers instead (the same guarantee, the other estimator);
2. a sequential run "against 50%": each cell stops once its band excludes 0.5;
3. the fixed-n baseline: for each cell of run 1, the smallest n at which a Wilson 95%
   interval by counting has the same half-width at the same share (≈ z² p(1 − p) / w²),
   sampled for real (one fixed-n run with the largest such n, capped by --fixed-cap) and
   timed.

Printed and written to benchmarks/results/sequential.json: samples and wall time (model
load included, the same for every run) per run and cell, and the ratios fixed / sequential.
Coverage: the bands are valid at 95% at every look at once (tests/test_sequential.py
simulates it); the Wilson baseline is 95% at its one fixed n.

    python -m benchmarks.sequential --threads 1 --max-samples 40 --prompts 1   # a check
    python -m benchmarks.sequential --accept-gemma-terms                        # the run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parents[1]
Z = 1.959963984540054  # the two-sided 95% normal quantile
MODELS = {
    # kit preset, spec, tracked field and value
    "smollm2": ("smollm2-135m-instruct", "examples/characters.toml", "gender", "male"),
    "gemma": ("gemma-3-270m", "examples/personajes-gemma.toml", "sexo", "masculino"),
}


def spec_data(name: str, kit: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The model's seed 000 spec, its answer drawn at T 1, on llama.cpp, `--prompts` items."""
    _, source, _, _ = MODELS[name]
    path = ROOT / source
    data = tomllib.loads(path.read_text("utf-8"))
    gguf = next(kit.glob("*.gguf"))
    data["model"] = {"id": str(gguf), "runtime": "llamacpp", "threads": args.threads}
    data["prompt"]["items"] = data["prompt"]["items"][: args.prompts]
    data["answer"] |= {"temperature": 1.0, "schema": str(path.parent / data["answer"]["schema"])}
    data["samples"] = args.max_samples
    return data


def run(data: dict[str, Any], folder: Path, label: str) -> dict[str, Any]:
    """Run one spec into a new store: wall seconds, and per prompt its samples, the
    stop and the counted share."""
    from muestra.experiments.runner import Runner
    from muestra.experiments.spec import spec_from_data
    from muestra.experiments.store import reading

    loaded = spec_from_data(data, folder / f"{label}.toml", check_models=False)
    store = folder / f"{label}.db"
    runner = Runner(loaded, store, batch_rows=64, on_note=lambda n: print(f"note: {n}"))
    started = time.perf_counter()
    with runner:
        runner.open()
        runner.run()
    seconds = time.perf_counter() - started
    stop = data.get("stop") or {}
    field = stop.get("field")
    cells: dict[str, Any] = {}
    with reading(store) as db:
        for row in db.execute(
            "SELECT p.prompt_key, s.answer_json FROM samples s JOIN prompts p ON p.id = s.prompt_id"
        ):
            cell = cells.setdefault(row[0], {"samples": 0, "answers": []})
            cell["samples"] += 1
            cell["answers"].append(json.loads(row[1]) if row[1] else None)
        for row in db.execute(
            "SELECT p.prompt_key, t.* FROM stops t JOIN prompts p ON p.id = t.prompt_id"
        ):
            keys = ("reason", "estimator", "estimate", "low", "high")
            cells[row[0]]["stop"] = {key: row[key] for key in keys}
    return {"seconds": seconds, "cells": cells, "field": field}


def counted(cell: dict[str, Any], field: str, value: str) -> tuple[float, float]:
    """(share, Wilson 95% half-width) of `value` among a cell's valid answers."""
    from muestra.analysis.stats import wilson

    found = [a.get(field) for a in cell["answers"] if isinstance(a, dict) and field in a]
    k = sum(1 for v in found if v == value)
    low, high = wilson(k, len(found))
    return k / max(len(found), 1), (high - low) / 2


def same_width(band: dict[str, Any], limit: int = 100_000) -> int:
    """The smallest n at which a fixed-n Wilson 95% interval by counting, at `band`'s
    share, is as narrow as `band` (≈ z² p (1 − p) / w², but exact near 0 and 1)."""
    from muestra.analysis.stats import wilson

    share, half = band["estimate"], (band["high"] - band["low"]) / 2
    n = max(1, math.floor(Z**2 * share * (1 - share) / max(half, 1e-9) ** 2) // 2)
    while n < limit:
        low, high = wilson(round(share * n), n)
        if (high - low) / 2 <= half:
            return n
        n += 1
    return limit


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from muestra.models.kit import ensure_kit

    preset, _, field, value = MODELS[name]
    where = Path(args.kit_dir) / preset if args.kit_dir else None
    kit = ensure_kit(preset, where, accept_terms=args.accept_gemma_terms)
    base = spec_data(name, kit, args)
    rule = {"field": field, "value": value, "min_samples": args.every, "every": args.every}
    precise = run({**base, "stop": {**rule, "precision": args.precision}}, folder, f"{name}-p")
    counting = {**rule, "precision": args.precision, "estimator": "counts"}
    counts = run({**base, "stop": counting}, folder, f"{name}-c")
    decided = run({**base, "stop": {**rule, "reference": 0.5}}, folder, f"{name}-r")
    fixed_n = {prompt: same_width(cell["stop"]) for prompt, cell in precise["cells"].items()}
    n = min(max(fixed_n.values()), args.fixed_cap)
    fixed = run({**base, "samples": n}, folder, f"{name}-fixed")
    rows = []
    for prompt in precise["cells"]:
        share, half = counted(fixed["cells"][prompt], field, value)
        rows.append(
            {
                "prompt": prompt,
                "precision_run": precise["cells"][prompt]["samples"],
                "precision_band": precise["cells"][prompt]["stop"],
                "counts_run": counts["cells"][prompt]["samples"],
                "counts_band": counts["cells"][prompt]["stop"],
                "reference_run": decided["cells"][prompt]["samples"],
                "reference_band": decided["cells"][prompt]["stop"],
                "fixed_n_same_width": fixed_n[prompt],
                "fixed_n_same_width_as_reference_run": same_width(decided["cells"][prompt]["stop"]),
                "fixed_run": fixed["cells"][prompt]["samples"],
                "fixed_share": share,
                "fixed_wilson_half_width": half,
            }
        )
    return {
        "tracked": f"{field}={value}",
        "cells": rows,
        "seconds": {k: r["seconds"] for k, r in (("precision", precise), ("counts", counts),
                                                  ("reference", decided), ("fixed", fixed))},
        "samples": {k: sum(c["samples"] for c in r["cells"].values())
                    for k, r in (("precision", precise), ("counts", counts),
                                 ("reference", decided), ("fixed", fixed))},
    }  # fmt: skip


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Fixed-n samples (same width by counting) over the sequential run's, summed over
    cells, and the same for wall time (the fixed run as run, capped)."""
    cells = result["cells"]
    needed = sum(c["fixed_n_same_width"] for c in cells)
    return {
        "samples_fixed_over_precision": needed / max(result["samples"]["precision"], 1),
        "seconds_fixed_over_precision": result["seconds"]["fixed"]
        / max(result["seconds"]["precision"], 1e-9),
        "samples_fixed_over_reference": sum(c["fixed_n_same_width_as_reference_run"] for c in cells)
        / max(result["samples"]["reference"], 1),
        # the same ±precision, the same anytime-valid guarantee: counting against field_probs
        "samples_counts_over_precision": result["samples"]["counts"]
        / max(result["samples"]["precision"], 1),
        "seconds_counts_over_precision": result["seconds"]["counts"]
        / max(result["seconds"]["precision"], 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma", help="smollm2, gemma or both")
    parser.add_argument("--prompts", type=int, default=2, help="prompt items per model")
    parser.add_argument("--max-samples", type=int, default=400, help="cap per cell")
    parser.add_argument("--fixed-cap", type=int, default=1000, help="cap of the fixed-n run")
    parser.add_argument("--precision", type=float, default=0.05)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accept-gemma-terms", action="store_true")
    parser.add_argument("--kit-dir", default=None, help="where kits are (default: muestra's)")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if "gemma" in names and not args.accept_gemma_terms:
        parser.error("Gemma 3 needs --accept-gemma-terms (the Gemma Terms of Use apply)")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            results[name] = bench_model(name, args, Path(folder))
            results[name]["ratios"] = ratios(results[name])
            print(json.dumps({name: results[name]}, indent=1, default=str))
    settings = {k: getattr(args, k) for k in ("prompts", "max_samples", "precision", "every")}
    path = write_result("sequential", {"settings": settings, **results})
    for name, result in results.items():
        shown = ", ".join(f"{k} {v:.2f}×" for k, v in result["ratios"].items())
        print(f"{name}: {shown}")
    print(f"→ {path}")


if __name__ == "__main__":
    main()
