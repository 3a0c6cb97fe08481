"""The README check's own rules (`make readme` runs the examples of README and of the docs'
pages; tests/readme_check.py): every block says how it is checked, shown files are the
shipped ones, the matcher can fail, and a repeated example runs once."""

from __future__ import annotations

import pytest

from conftest import ROOT
from readme_check import Sandbox, all_blocks, blocks, check_shown, documents, shown_output


def test_every_block_of_readme_and_the_docs_says_how_it_is_checked():
    found = all_blocks()
    assert len(found) > 50
    assert {b.document for b in found} >= {"README.md", "docs/getting-started.md"}
    unmarked = [b.label for b in found if b.kind is None]
    assert unmarked == [], f"blocks without `<!-- check: … -->`: {unmarked}"
    assert {b.kind for b in found} <= {"run", "output", "session", "file", "skip"}
    assert all(b.options.get("reason") for b in found if b.kind == "skip")
    names = {b.options["name"] for b in found if b.kind == "run" and "name" in b.options}
    for block in found:
        if block.kind == "output" and "command" not in block.options:
            assert block.options["name"] in names, block.label


def test_the_files_readme_shows_are_the_shipped_ones():
    sandbox = Sandbox(ROOT, ROOT / "no-home")
    for block in all_blocks():
        if block.kind == "file":
            assert sandbox.run(block) is None, block.label


def test_the_documents_are_read_in_the_sites_order():
    order = [str(p.relative_to(ROOT)) for p in documents()]
    assert order[:3] == ["README.md", "docs/index.md", "docs/getting-started.md"]
    assert order.index("docs/guide/generate.md") < order.index("docs/guide/serving.md")
    assert blocks("```{toctree}\nx\n```\n") == []  # a MyST directive is not an example


def test_shown_lines_must_be_printed_in_order():
    printed = "a header\n│ care │ 1.8%  │ 8.8% │\nnoise\ndone: 400 samples in 200.6s\n"
    assert check_shown(["│ care   │ 1.8% │ 8.8%   │", "done: … samples in 200.6s"], printed) is None
    assert check_shown(["done: 400 samples in 1.0s"], printed) is not None  # a number differs
    assert check_shown(["done: 401 samples in 1.0s"], printed, numbers=True) is None
    assert check_shown(["noise", "│ care │ 1.8% │ 8.8% │"], printed) is not None  # order
    assert check_shown(["something else"], printed) is not None


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (["cmd a", "# out 1", "# out 2", "", "# a remark", "cmd b"], ["out 1", "out 2"]),
        (["cmd \\", "  --flag", "# out"], ["out"]),
        (["# remark first", "cmd"], []),
    ],
)
def test_the_comment_lines_after_a_command_are_its_output(body, shown):
    assert shown_output(body) == shown


def test_blocks_share_one_shell_and_a_failure_is_reported(tmp_path):
    from readme_check import Block

    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    sandbox = Sandbox(tmp_path, tmp_path)
    assert sandbox.run(Block(1, "bash", ["K=~/kit"], "run")) is None
    assert sandbox.run(Block(2, "bash", ["echo $K", f"# {tmp_path}/kit"], "run")) is None
    assert sandbox.run(Block(3, "bash", ["echo other", "# 5"], "run")) is not None
    assert sandbox.run(Block(4, "bash", ["false"], "run")) is not None
    assert sandbox.run(Block(5, "bash", ["false"], "run", {"expect": "fail"})) is None
    assert "no `<!-- check" in sandbox.run(Block(6, "bash", ["true"], None))


def test_a_repeated_example_runs_once_and_its_output_is_still_compared(tmp_path):
    from readme_check import Block

    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    sandbox = Sandbox(tmp_path, tmp_path)
    counter = ["echo x >> count.txt; wc -l < count.txt"]
    assert sandbox.run(Block(1, "bash", [*counter, "# 1"], "run")) is None
    assert sandbox.run(Block(9, "bash", [*counter, "# 1"], "run", document="b.md")) is None
    assert (tmp_path / "count.txt").read_text() == "x\n"  # not run a second time
    assert sandbox.run(Block(9, "bash", [*counter, "# 2"], "run")) is not None  # compared


def test_the_lanes_need_nothing_from_each_other(tmp_path):
    """After the first steps, three lanes of pages run at once in the same sandbox: a kit
    a page of a lane uses is built before the lanes split (or in its own lane), only one
    lane starts servers (they take port 8000), and a lane's shell variables stay its own."""
    import re

    from readme_check import LANES, PARALLEL_FROM, Block, lanes

    where = {str(p.relative_to(ROOT)): k for k, p in enumerate(documents())}
    assert all(where[page] >= where[PARALLEL_FROM] for pages in LANES for page in pages)
    lane = lanes()
    assert [lane["docs/guide/gemma.md"], lane["docs/guide/alignment.md"]] == [1, 2]
    assert set(lane.values()) == {0, 1, 2, 3}
    built = {k: set() for k in range(4)}
    used = {k: set() for k in range(4)}
    servers = set()
    for block in all_blocks():
        if block.kind not in ("run", "session"):
            continue
        text = "\n".join(block.body)
        built[lane[block.document]] |= set(re.findall(r"kit build --preset ([\w.-]+)", text))
        used[lane[block.document]] |= set(re.findall(r"muestra/kit/([\w.-]+)", text))
        if re.search(r"^muestra serve .*&\s*$", text, re.M):
            servers.add(lane[block.document])
    for k in (1, 2, 3):
        assert used[k] <= built[0] | built[k], (k, used[k] - built[0] - built[k])
    assert len(servers - {0}) <= 1, servers

    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    first = Sandbox(tmp_path, tmp_path)
    assert first.run(Block(1, "bash", ["K=~/kit"], "run")) is None
    one, two = first.fork("[lane 1] "), first.fork("[lane 2] ")
    assert one.run(Block(2, "bash", ["J=1"], "run")) is None
    assert (
        two.run(Block(3, "bash", ["echo $K ${J:-unset}", f"# {tmp_path}/kit unset"], "run")) is None
    )


def test_long_blocks_are_left_out_with_their_outputs_when_asked(tmp_path):
    """`make readme LONG=0` (CI): a block marked long="…" is not run, nor the output
    block of its name checked; without the flag both are."""
    from readme_check import Block

    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    long = {"name": "big", "long": "a minute"}
    for leave in (True, False):
        sandbox = Sandbox(tmp_path, tmp_path, leave_long=leave)
        ran = Block(1, "bash", ["echo ran >> ran.txt; echo 42"], "run", long)
        assert sandbox.run(ran) is None
        shown = sandbox.run(Block(5, "", ["41"], "output", {"name": "big"}))
        assert (shown is None) == leave  # 42 was printed, not 41: checked only when run
    assert (tmp_path / "ran.txt").read_text() == "ran\n"  # run once, without the flag
