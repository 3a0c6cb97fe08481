"""`make bench`: run the benchmarks, print a table, write benchmarks/results/*.json.

Knobs: `--quick` (fewer repeats), `--repeats N`, `--seed-loop-samples N`, `--only NAME`,
`--kit-dir DIR`. `--only real_model` runs just the real SmolLM2-135M-Instruct benchmarks
(benchmarks/real_model.py), without building the random-weight qwen3-0.6b kit; `--only
decoding` the decoding strategies on it (benchmarks/decoding.py: beam search vs HF);
`--only align` reward training, DPO and reward scoring on it (benchmarks/align.py);
`--only step_profile` where a decode step's time goes, and what torch.compile gives
(benchmarks/step_profile.py); `--only llamacpp` the llama.cpp runtime against llama.cpp's
own loop, `llama-batched-bench`, `llama-server` and HF (benchmarks/llamacpp.py; builds
the two llama.cpp programs once); `--only shapes` Qwen3-1.7B and Qwen3-4B shapes with
random weights as Q8_0/Q4_K_M GGUFs: memory plan against llama.cpp and the peak, speed
against `llama-batched-bench` (benchmarks/shapes.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import align as align_bench
from benchmarks import decoding as decoding_bench
from benchmarks import engine as engine_bench
from benchmarks import evaluation as evaluation_bench
from benchmarks import llamacpp as llamacpp_bench
from benchmarks import real_model as real_model_bench
from benchmarks import server as server_bench
from benchmarks import shapes as shapes_bench
from benchmarks import step_profile as step_profile_bench
from benchmarks import structured as structured_bench
from benchmarks.common import write_result

console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 seed-loop samples.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed-loop-samples", type=int, default=4)
    parser.add_argument(
        "--only",
        choices=[
            "batch",
            "seed000",
            "floor",
            "masks",
            "compile",
            "structured000",
            "server",
            "real_model",
            "decoding",
            "evaluation",
            "align",
            "step_profile",
            "llamacpp",
            "shapes",
        ],
        default=None,
    )
    parser.add_argument(
        "--kit-dir",
        type=Path,
        default=None,
        help="Folder of the kit models (built there when missing); default: muestra's cache.",
    )
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    loop_samples = 2 if args.quick else args.seed_loop_samples

    from muestra.models.kit import ensure_kit
    from muestra.models.loading import load_model

    real_only = ("real_model", "decoding", "evaluation", "align", "step_profile", "llamacpp",
                 "shapes")  # fmt: skip
    if args.only not in real_only:
        console.print("building/loading the kit's qwen3-0.6b (random weights, bf16) …")
        kit = ensure_kit("qwen3-0.6b", args.kit_dir / "qwen3-0.6b" if args.kit_dir else None)
        loaded = load_model(str(kit), dtype="bfloat16", device="cpu")
    results = {}
    if args.only in (None, "batch"):
        results["batch"] = engine_bench.bench_batch(loaded, repeats)
    if args.only in (None, "seed000"):
        results["seed000"] = engine_bench.bench_seed_000(loaded, repeats, loop_samples)
    if args.only in (None, "floor"):
        results["floor"] = engine_bench.bench_decode_floor(loaded, repeats)
    structured = {}
    if args.only in (None, "masks"):
        structured["masks"] = structured_bench.bench_masks(loaded, repeats)
    if args.only in (None, "compile"):
        structured["compile"] = structured_bench.bench_compile(loaded)
    if args.only in (None, "structured000"):
        structured["seed000"] = structured_bench.bench_seed_000(loaded, repeats, loop_samples)
    served = {}
    if args.only in (None, "server"):
        served["server"] = server_bench.bench_server(loaded, kit, repeats)
    paths = []
    if results:
        paths.append(write_result("engine", {"repeats": repeats, **results}, merge=bool(args.only)))
    if structured:
        paths.append(
            write_result("structured", {"repeats": repeats, **structured}, merge=bool(args.only))
        )
    if served:
        paths.append(write_result("server", {"repeats": repeats, **served}, merge=bool(args.only)))
    real = None
    if args.only in (None, "real_model"):
        console.print("building/loading the kit's smollm2-135m-instruct (real weights) …")
        real = real_model_bench.bench_real_model(args.kit_dir, repeats)
        paths.append(write_result("real_model", {"repeats": repeats, **real}))

    decoding = None
    if args.only in (None, "decoding"):
        console.print("decoding strategies on the real model (smollm2-135m-instruct, fp32) …")
        small = ensure_kit("smollm2-135m-instruct", kit_root("smollm2-135m-instruct", args))
        smol = load_model(str(small), dtype="float32")
        decoding = {
            "beam": decoding_bench.bench_beam(smol, repeats),
            "dola": decoding_bench.bench_dola(smol, repeats),
            "lookup": decoding_bench.bench_lookup(smol, repeats),
            "speculative": decoding_bench.bench_speculative(smol, repeats),
        }
        paths.append(write_result("decoding", {"repeats": repeats, **decoding}))

    if args.only in (None, "align"):
        console.print("reward model, DPO and reward scoring on the real model (fp32) …")
        small = ensure_kit("smollm2-135m-instruct", kit_root("smollm2-135m-instruct", args))
        aligned = align_bench.bench_align(small)
        paths.append(write_result("align", aligned))
        r, d, s = aligned["reward_train"], aligned["dpo"], aligned["reward_score"]
        console.print(
            f"{aligned['pairs']} pairs from {aligned['samples']} character samples "
            f"({aligned['audit_seconds']:.0f} s): reward training {r['seconds']:.0f} s, "
            f"peak {r['peak_rss_mib']:.0f} MiB; DPO {d['seconds']:.0f} s, peak "
            f"{d['peak_rss_mib']:.0f} MiB; reward score {s['samples_per_s']:.1f} samples/s"
        )

    if args.only in (None, "step_profile"):
        console.print("a decode step's profile on the real model (smollm2-135m-instruct, fp32) …")
        profile = step_profile_bench.bench_step_profile(args.kit_dir)
        paths.append(write_result("step_profile", profile))
        for n in (1, 32):
            r = profile[f"batch{n}"]
            console.print(
                f"batch {n}: {r['step_ms']:.1f} ms a step; self CPU time: matmul "
                f"{r['matmul_share']:.0%}, attention {r['attention_share']:.0%}, the rest "
                f"{r['other_share']:.0%}"
            )
        h = profile["hf_static"]
        console.print(
            f"fp32 weights {profile['weight_bytes'] / 1e6:.0f} MB → floor "
            f"{profile['floor_ms']:.1f} ms at {profile['copy_bandwidth_gb_s']:.1f} GB/s; HF "
            f"static cache at batch 1: eager {h['eager_step_ms']:.1f} ms, torch.compile "
            f"{h['compiled_step_ms']:.1f} ms after {h['compile_s']:.0f} s of compiling "
            f"({h['compiled_vs_eager']:.2f}× eager, {h['compiled_vs_muestra_batch1']:.2f}× "
            "muestra's eager step)"
        )

    if args.only in (None, "llamacpp"):
        console.print("the llama.cpp runtime against llama.cpp, llama-server and HF …")
        cpp = llamacpp_bench.bench_llamacpp(args.kit_dir, repeats)
        paths.append(write_result("llamacpp", {"repeats": repeats, **cpp}))
        for name, ratio in cpp["ratios"].items():
            console.print(f"{name}: {ratio:.2f}×")
        answers = cpp["seed000_answers"]
        console.print(
            f"seed 000 answers: {answers['samples_per_s']} samples/s, male shares "
            f"{answers['male_share']}, field_probs overhead {answers['field_probs_overhead']:.0%}"
        )

    if args.only in (None, "shapes"):
        console.print("real shapes: Qwen3-1.7B and Qwen3-4B, random weights, as GGUFs …")
        shapes = shapes_bench.bench_shapes(repeats=repeats, kit_root=args.kit_dir)
        paths.append(write_result("shapes", {"repeats": repeats, **shapes}))
        for preset in shapes_bench.PRESETS:
            speed, peak = shapes[preset]["speed"], shapes[preset]["peak_vs_plan"]
            console.print(
                f"{preset} {speed['quant']}: batch 1 vs llama-batched-bench "
                f"{speed['exact_batch1_vs_bench']:.2f}× (exact), "
                f"{speed['free_batch1_vs_bench']:.2f}× (free); {shapes['rows']} rows "
                f"{speed['exact_rows_vs_bench']:.2f}× / {speed['free_rows_vs_bench']:.2f}×; "
                f"peak RSS / plan {peak['default_budget']['peak_over_plan']:.2f}"
            )

    evaluation = None
    if args.only in (None, "evaluation"):
        console.print("evaluation on the real model (smollm2-135m-instruct, fp32) …")
        small = ensure_kit("smollm2-135m-instruct", kit_root("smollm2-135m-instruct", args))
        smol = load_model(str(small), dtype="float32")
        evaluation = {
            "loglik": evaluation_bench.bench_loglik(smol, repeats),
            "choice": evaluation_bench.bench_choice_vs_draws(small),
        }
        paths.append(write_result("evaluation", {"repeats": repeats, **evaluation}))
        for key, r in evaluation["loglik"].items():
            console.print(
                f"loglik {key}: muestra {r['muestra_s']:.2f}s vs HF one question at a time "
                f"{r['hf_per_question_s']:.2f}s = {r['speedup']:.2f}× (goal ≥ 3×), same values "
                f"within {r['max_abs_diff']:.1e}"
            )
        c = evaluation["choice"]
        console.print(
            f"choice easy-en: expected accuracy {c['expected_accuracy']:.3f} ± width "
            f"{c['expected_width']:.3f} in {c['exact_s']:.1f}s vs 20 draws/question "
            f"{c['draw_accuracy']:.3f} ± width {c['draws_width']:.3f} in {c['draws_s']:.1f}s "
            f"(argmax accuracy {c['argmax_accuracy']:.3f} ± width {c['argmax_width']:.3f})"
        )

    table = Table(title="muestra engine benchmarks (qwen3-0.6b shapes, bf16, this CPU)")
    for column in ("benchmark", "muestra", "reference", "ratio", "goal"):
        table.add_column(column)
    if "batch" in results:
        r = results["batch"]
        table.add_row(
            "16 prompts → 32 tokens",
            f"{r['engine_s']:.2f}s",
            f"HF {r['hf_generate_s']:.2f}s",
            f"{r['speedup_vs_hf']:.2f}× HF",
            "≥ 1.0× (aim 1.2×)",
        )
    if "seed000" in results:
        r = results["seed000"]
        table.add_row(
            "seed 000 × 32 × 64",
            f"{r['engine_s']:.2f}s",
            f"HF {r['hf_generate_s']:.2f}s",
            f"{r['speedup_vs_hf']:.2f}× HF",
            "≥ 1.3× HF",
        )
        table.add_row(
            "",
            "",
            f"seed loop {r['seed_loop_s_scaled_to_32']:.1f}s",
            f"{r['speedup_vs_seed_loop']:.1f}× loop",
            "≥ 5× loop",
        )
    if "floor" in results:
        r = results["floor"]
        table.add_row(
            "batch-1 decode step",
            f"{r['step_s'] * 1000:.1f} ms",
            f"floor {r['floor_s'] * 1000:.1f} ms",
            f"{r['ratio_to_floor']:.2f}× floor",
            "≤ 1.5× floor",
        )
    if "masks" in structured:
        r = structured["masks"]
        table.add_row(
            "answer step, 32 rows",
            f"masked {r['masked_step_s'] * 1000:.0f} ms",
            f"free {r['free_step_s'] * 1000:.0f} ms",
            f"{r['ratio']:.2f}×",
            "≤ 1.10×",
        )
        table.add_row(
            "mask fill / row-token",
            f"median {r['fill_per_row_token_us_median']:.0f} µs",
            f"p99 {r['fill_per_row_token_us_p99']:.0f} µs",
            "",
            "",
        )
    if "compile" in structured:
        r = structured["compile"]
        table.add_row(
            "Personaje compile",
            f"cold {r['cold_s'] * 1000:.1f} ms",
            f"memory cache {r['memory_cached_s'] * 1e6:.0f} µs",
            "",
            "",
        )
    if "seed000" in structured:
        r = structured["seed000"]
        table.add_row(
            "seed 000 structured × 32",
            f"{r['muestra_s']:.1f}s",
            f"notebook loop {r['notebook_loop_s_scaled_to_32']:.1f}s",
            f"{r['speedup_vs_notebook']:.1f}×",
            "≥ 5×",
        )
        table.add_row("  + field_probs", f"{r['muestra_with_field_probs_s']:.1f}s", "", "", "")
    if "server" in served:
        r = served["server"]
        table.add_row(
            "32 chat requests, server",
            f"{r['server_concurrent_s']:.1f}s",
            f"in-process {r['in_process_s']:.1f}s",
            f"{r['server_overhead']:.2f}×",
            "≤ 1.15×",
        )
        table.add_row(
            "  continuous batching",
            f"{r['server_concurrent_s']:.1f}s",
            f"one at a time {r['server_one_at_a_time_s_scaled_to_32']:.1f}s",
            f"{r['continuous_batching_speedup']:.1f}× faster",
            "",
        )
    if table.row_count:
        console.print(table)
    if real is not None:
        print_real_model(real)
    if decoding is not None:
        print_decoding(decoding)
    for path in paths:
        console.print(f"results written to {path}")


def kit_root(preset: str, args: argparse.Namespace) -> Path | None:
    return args.kit_dir / preset if args.kit_dir else None


def print_decoding(decoding: dict[str, Any]) -> None:
    table = Table(title="decoding strategies, real model (SmolLM2-135M-Instruct, fp32)")
    for column in ("benchmark", "muestra", "reference", "ratio", "goal"):
        table.add_column(column)
    r = decoding["beam"]
    same = "same hypotheses" if r["same_hypotheses_as_hf"] else "DIFFERENT hypotheses"
    table.add_row(
        "beam search, 4 prompts × 4 beams",
        f"{r['engine_s']:.2f}s",
        f"HF {r['hf_generate_s']:.2f}s ({same})",
        f"{r['speedup_vs_hf']:.2f}× HF",
        "≥ 1.3×",
    )
    for rows in (1, 8):
        r = decoding["dola"][f"rows_{rows}"]
        for dola in ("low", "high"):
            table.add_row(
                f"DoLa {dola} ({len(r[dola]['layers'])} layers), {rows} row(s) × "
                f"{decoding['dola']['new_tokens']}",
                f"{r[dola]['s']:.2f}s",
                f"plain greedy {r['plain_s']:.2f}s",
                f"{r[dola]['cost']:.2f}× the time",
                "",
            )
    for name, r in decoding["lookup"].items():
        same = "same tokens" if r["same_tokens_as_greedy"] else "DIFFERENT tokens"
        table.add_row(
            f"prompt lookup, {name.replace('_', ' ')}, {r['tokens']} tokens",
            f"{r['lookup_s']:.2f}s ({r['forwards']} forwards)",
            f"plain greedy {r['plain_s']:.2f}s ({same})",
            f"{r['speedup']:.2f}×",
            f"accepted {r['acceptance_rate']:.0%}",
        )
    r = decoding["speculative"]
    same = "same tokens" if r["same_tokens_as_greedy"] else "DIFFERENT tokens"
    table.add_row(
        f"speculative, layer draft 24/30, {r['tokens']} tokens",
        f"{r['speculative_s']:.2f}s ({r['rounds']} rounds)",
        f"plain greedy {r['plain_s']:.2f}s ({same})",
        f"{r['speedup']:.2f}×",
        f"accepted {r['acceptance_rate']:.0%}",
    )
    console.print(table)


def print_real_model(real: dict[str, Any]) -> None:
    """The real model's table, and one line on llama.cpp when it was skipped."""
    table = Table(title="real model: SmolLM2-135M-Instruct (this CPU, tokens/s)")
    for column in ("benchmark", "muestra", "reference", "ratio"):
        table.add_column(column)
    r = real["seed000"]
    table.add_row(
        "seed 000 × 32 × ≤64, T 0.7, fp32",
        f"{r['engine_tok_s']:.1f} tok/s",
        f"HF {r['hf_tok_s']:.1f} tok/s",
        f"{r['speedup_vs_hf']:.2f}× HF",
    )
    r = real["field_probs"]
    seconds = r["seconds"]
    table.add_row(
        "characters × 32, field_probs",
        f"in loop {r['in_loop_overhead']:+.0%} ({seconds['in_loop']:.1f} s)",
        f"post hoc {r['post_hoc_overhead']:+.0%} ({seconds['post_hoc']:.1f} s)",
        f"without {seconds['plain']:.1f} s; max |Δp| {r['max_probability_difference']:.1e}",
    )
    for name, r in real["jump_forward"].items():
        if name == "workload":
            continue
        forwards, seconds = r["forwards"], r["seconds"]
        table.add_row(
            f"{name}: jump-forward",
            f"{forwards['jump_forward']} forwards, {seconds['jump_forward']:.2f} s",
            f"{forwards['token_by_token']} forwards, {seconds['token_by_token']:.2f} s",
            f"{r['forward_ratio']:.2f}× fewer, {r['speedup']:.2f}× faster"
            + (f" ({r['samples_that_differ']} samples differ)" if r["samples_that_differ"] else ""),
        )
    for dtype, r in real["greedy"].items():
        if dtype == "workload":
            continue
        table.add_row(
            f"batch-1 greedy × 64, {dtype}",
            f"{r['engine_tok_s']:.1f} tok/s",
            f"HF {r['hf_tok_s']:.1f} tok/s",
            f"{r['speedup_vs_hf']:.2f}× HF",
        )
        table.add_row(
            "  decoding alone",
            f"{r['engine_decode_tok_s']:.1f} tok/s",
            f"HF {r['hf_decode_tok_s']:.1f} tok/s",
            f"{r['engine_decode_tok_s'] / r['hf_decode_tok_s']:.2f}× HF",
        )
    console.print(table)


if __name__ == "__main__":
    main()
