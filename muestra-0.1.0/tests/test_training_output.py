"""Training outputs are atomic: `reward train` and `align dpo|rloo` train into a hidden
scratch folder beside `--out`, write `muestra-train.json` last and rename the folder into
place. A process killed (SIGKILL) at any point leaves no `--out` and only a scratch
folder that every loading command refuses; Ctrl-C says what happened and leaves nothing;
`--out` must be new or empty (or `--overwrite`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_align import keyword_pairs

KILL_POINTS = {
    # the moment the child kills itself: (module, function) wrapped to SIGKILL first
    "before training": ("muestra.evaluation.reward", "run_training"),
    "after the weights, before the tokenizer": (
        "transformers",
        "PreTrainedTokenizerBase.save_pretrained",
    ),
    "after the tokenizer, before the provenance": ("muestra.evaluation.reward", "write_record"),
}
CHILD = """
import importlib, os, signal, sys
module, name = sys.argv[1], sys.argv[2]
owner = importlib.import_module(module)
if "." in name:
    cls_name, name = name.split(".")
    owner = getattr(owner, cls_name)
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, name, die)
sys.argv = ["muestra", *sys.argv[3:]]
from muestra.cli.app import main
main()
"""


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    keyword_pairs(8).write(path)
    return path


def train_args(tiny_kit: Path, pairs: Path, out: Path) -> list[str]:
    return [
        "reward", "train", "--base", str(tiny_kit), "--data", str(pairs), "--out", str(out),
        "--epochs", "0.5", "--batch-size", "4",
    ]  # fmt: skip


def scratch_folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.long  # a process killed or raced end to end: `make test-long`
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_training_leaves_no_folder_any_command_accepts(
    point, tiny_kit, pairs_file, tmp_path, cli
):
    module, name = KILL_POINTS[point]
    out = tmp_path / "models" / "rm"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, module, name, *train_args(tiny_kit, pairs_file, out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not out.exists()  # --out appears only complete
    left = scratch_folders(out.parent)
    assert len(left) == 1 and (left[0] / "muestra-train.partial").is_file()
    store = tmp_path / "s.db"
    store.write_bytes(b"")
    refused = cli("reward", "score", str(store), "--reward", str(left[0]))
    assert refused.code == 2 and "did not finish" in refused.stderr, refused.stderr
    from muestra.errors import ModelLoadError
    from muestra.models.loading import check_model

    with pytest.raises(ModelLoadError, match="did not finish"):
        check_model(str(left[0]))
    # a folder that lost its provenance (killed by an older muestra, or copied by hand)
    half = tmp_path / "half"
    half.mkdir()
    for item in left[0].iterdir():
        if item.is_file() and item.name != "muestra-train.partial":
            (half / item.name).write_bytes(item.read_bytes())
    refused = cli("reward", "score", str(store), "--reward", str(half))
    assert refused.code == 2 and "has no muestra-train.json" in refused.stderr, refused.stderr


@pytest.mark.long  # a process killed or raced end to end: `make test-long`
def test_ctrl_c_says_what_happened_and_cleans_its_scratch(tiny_kit, pairs_file, tmp_path):
    out = tmp_path / "rm"
    child = subprocess.run(
        [sys.executable, "-c", CHILD.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                             "raise KeyboardInterrupt"),
         "muestra.evaluation.reward", "run_training", *train_args(tiny_kit, pairs_file, out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 130, child.stderr[-2000:]
    assert "interrupted" in child.stderr and "nothing was written to" in child.stderr
    assert "Traceback" not in child.stderr
    assert not out.exists() and scratch_folders(tmp_path) == []


def test_out_must_be_new_or_empty_and_overwrite_replaces_it(tiny_kit, pairs_file, tmp_path, cli):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    result = cli(*train_args(tiny_kit, pairs_file, a_file))
    assert result.code == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr
    assert a_file.read_text() == "keep me"
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    result = cli(*train_args(tiny_kit, pairs_file, full))
    assert result.code == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    for command in (["align", "dpo"], ["align", "rloo", "--reward", str(tmp_path)]):
        args = [*command, "--base", str(tiny_kit), "--data", str(pairs_file), "--out"]
        assert "not empty" in cli(*args, str(full)).stderr
        assert "is a file" in cli(*args, str(a_file)).stderr
    assert (full / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(*train_args(tiny_kit, pairs_file, empty)).code == 0
    assert (empty / "muestra-train.json").is_file()
    result = cli(*train_args(tiny_kit, pairs_file, full), "--overwrite")
    assert result.code == 0, result.stderr
    assert not (full / "notes.txt").exists() and (full / "muestra-train.json").is_file()
    assert json.loads((full / "muestra-train.json").read_text())["kind"] == "reward"
    assert scratch_folders(tmp_path) == []
    # a finished folder is accepted where a reward model is asked for, and not elsewhere
    result = cli(
        "align", "rloo", "--base", str(tiny_kit), "--reward", str(tmp_path / "none"),
        "--data", str(pairs_file), "--out", str(tmp_path / "p"),
    )  # fmt: skip
    assert result.code == 2 and "--reward" in result.stderr


def test_reward_folders_that_do_not_load_are_one_line_errors(tiny_kit, pairs_file, tmp_path, cli):
    good = tmp_path / "rm"
    assert cli(*train_args(tiny_kit, pairs_file, good)).code == 0
    store = tmp_path / "s.db"
    store.write_bytes(b"")
    for damage in ("config", "tokenizer"):
        bad = tmp_path / damage
        bad.mkdir()
        for item in good.iterdir():
            (bad / item.name).write_bytes(item.read_bytes())
        if damage == "config":
            (bad / "config.json").write_text("{}")
        else:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (bad / name).unlink(missing_ok=True)
        result = cli("reward", "score", str(store), "--reward", str(bad))
        assert result.code == 2, result.stderr
        assert "Traceback" not in result.stderr and str(bad) in result.stderr
        assert "does not load as a reward model" in result.stderr
