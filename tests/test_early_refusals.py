"""Refusals before work, on a busy machine too: every command refuses a bad argument or
file before it imports torch, transformers, TRL or datasets (`reward train` with a base
that is not a model took over 60 s to refuse on a loaded machine: it imported TRL and
torch first). Checked in one fresh interpreter, case after case, by what `sys.modules`
holds after each refusal — not by a clock."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "trl", "datasets", "llama_cpp")

SCRIPT = """
import json, sys
from muestra.cli.app import app
report = []
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="muestra", standalone_mode=False)
        code = 0
    except SystemExit as done:
        code = done.code
    except Exception as err:
        code = getattr(err, "exit_code", repr(err))
    heavy = [m for m in {heavy!r} if m in sys.modules]
    report.append({{"args": args, "code": code, "heavy": heavy}})
    if heavy:
        break
print(json.dumps(report))
"""

GOOD_PAIR = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}


def cases(tiny_kit, folder) -> list[list[str]]:
    good = folder / "good.jsonl"
    good.write_text(json.dumps(GOOD_PAIR) + "\n" + json.dumps({**GOOD_PAIR, "chosen": "Hey"}))
    bad = folder / "bad.jsonl"
    bad.write_text("{}\n")
    spec = folder / "spec.toml"
    spec.write_text('name = "x"\nsamples = 2\n[model]\nid = "/nope"\n[prompt]\nuser = "hi"\n'
                    '[[prompt.items]]\nid = "a"\n')  # fmt: skip
    unknown = folder / "unknown.toml"
    unknown.write_text(spec.read_text().replace("samples = 2", "samples = 2\nfoo = 1"))
    nope, out, tiny = str(folder / "nope"), str(folder / "out"), str(tiny_kit)
    return [
        ["reward", "train", "--base", nope, "--data", str(good), "--out", out],
        ["reward", "train", "--base", tiny, "--data", str(folder / "none.jsonl"), "--out", out],
        ["reward", "train", "--base", tiny, "--data", str(bad), "--out", out],
        ["reward", "train", "--base", tiny, "--data", str(good), "--out", str(good)],
        ["align", "dpo", "--base", nope, "--data", str(good), "--out", out],
        ["align", "rloo", "--base", tiny, "--reward", nope, "--data", str(good), "--out", out],
        ["reward", "score", str(folder / "none.db"), "--reward", nope],
        ["pairs", str(folder / "none.db"), "--chosen", "a", "--rejected", "b", "--out", out],
        ["run", str(folder / "none.toml")],
        ["run", str(spec)],
        ["run", str(unknown)],
        ["generate", nope, "--prompt", "hi"],
        ["serve", nope],
        ["tokens", nope, "hola"],
        ["next", nope, "hola"],
        ["kit", "build", "--preset", "nope", "--out", out],
        ["eval", nope, "easy-en"],
        ["compare", nope, tiny, "--task", "easy-en"],
        ["probe", str(folder / "none.toml"), "--model", tiny],
    ]


def test_every_command_refuses_before_importing_torch_or_trl(tiny_kit, tmp_path):
    given = cases(tiny_kit, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=HEAVY), json.dumps(given)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case in report:
        assert case["code"] == 2, case
        assert not case["heavy"], f"{case['args']} imported {case['heavy']} before refusing"
    assert len(report) == len(given)
