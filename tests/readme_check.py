"""README and the docs as a test: every code block of README.md and of the site's pages
(docs/, in the order of docs/index.md's table of contents) is run or checked, in order,
as a newcomer reading them would meet it (`make readme`; `.ci/run` runs it after
`make test`). All documents share one sandbox and one shell, as one reader has.

Each fenced block carries, on the line before it, an HTML comment that says what it is
(GitHub does not show it):

    <!-- check: run [name=ID] [expect=fail] [env="K=V K2=V2"] [timeout=S] -->
        a bash or python block, executed (bash with -eo pipefail) in a clean copy of the
        repository with a fresh HOME (so `~/.cache/muestra/kit/...` is the newcomer's
        kit). Comment lines `# ...` right after a command line are that command's shown
        output: they must appear, in order, in what the block printed. `env` makes a long
        example smaller (README says which), `expect=fail` wants a non-zero exit.
    <!-- check: output name=ID [match=numbers] [optional=PREFIX] -->
        a block of shown output (lines starting with `$ ` are the commands, not output):
        its lines must appear, in order, in what the block `ID` printed; lines starting
        with PREFIX need not (a reduced run's findings may not reach significance).
    <!-- check: session [match=numbers] [env=...] -->
        a shown terminal session: each `$ ` line is run (in order, in the same sandbox)
        and the lines after it must appear, in order, in what it printed.
    <!-- check: output command="..." name=ID ... -->
        as `output`, running `command` first (once) when no block named ID ran.
    <!-- check: file path=PATH -->
        a block that shows a shipped file: every line must be a line of PATH.
    <!-- check: skip reason="..." -->
        not run here, for the reason given (a GPU machine, another vendor's server).

A `run` or `session` block may add `long="REASON"` (what makes it long): `--leave-long`
(`make readme LONG=0`, what CI runs) leaves it out, with the output blocks of its name;
`make readme` runs it. These are gemma.md's full-scale runs of Gemma (800-sample probes,
the 400-sample few-shot run: CI runs the same commands at a few samples in `make
test-long`, tests/test_gemma.py) and alignment.md's audit → align → re-audit loop.

`muestra serve … &` in a run block starts a server that stays up for the blocks after it
(its log in the sandbox), once /health answers; a later server, or the end, stops it.
Lines starting with `# ` in an output or session block summarise the output in words
and are not matched. A block without a comment fails the check, so no example escapes
it. Matching: spaces are collapsed and rich's table rules (━─═) shortened, `…` or `...`
match any text, and with match=numbers every number matches any number (times and speeds
of this machine).

A `run` block whose text and options repeat an earlier one exactly (the same first
steps shown in English and in Spanish, say) is not run again: its shown output is
compared with what the first one printed. So a page may repeat an example at no cost.

Three lanes. The pages before `PARALLEL_FROM` run first, alone (they build the kits the
others use); then the lanes of `LANES` and a last lane of every other page run at once,
each in reading order with its own copy of the shell's variables and named outputs, in
the same sandbox. A page's blocks half wait on one thread (imports, analyses, a store, a
model's load), so three lanes on 2 cores fill what two left idle (measured on an AMD EPYC
of 2 cores: 37:41 in two lanes, 55:25 in one with other work beside it). A page must not
need a file or a name a page of another lane makes (pages make their own stores; only
serving.md starts servers), and the lanes are balanced by hand: gemma.md, probes.md
and evaluation.md; alignment.md (~18 minutes; left out by `--leave-long`), strategies,
serving, runtimes and models; experiments.md and the rest.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TOCTREE = re.compile(r"^```\{toctree\}\s*$")
COMMENT = re.compile(r"^<!--\s*check:\s*(\w+)(.*?)-->\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S+$")
NUMBER = r"[-+−]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?"
# the page from which the lanes run at once, and the pages of each lane but the last
# (measured in two lanes, minutes: alignment 18, gemma 19 with its full-scale runs and 2
# without (LONG=0), experiments 7, probes 3, generate 3, evaluation 1, the rest 6)
PARALLEL_FROM = "docs/guide/experiments.md"
LANES = (
    ("docs/guide/gemma.md", "docs/guide/probes.md", "docs/guide/evaluation.md"),
    ("docs/guide/alignment.md", "docs/guide/strategies.md", "docs/guide/serving.md",
     "docs/guide/runtimes.md", "docs/guide/models.md"),
)  # fmt: skip


@dataclass
class Block:
    line: int  # where its fence opens in its document
    lang: str
    body: list[str]
    kind: str | None
    options: dict[str, str] = field(default_factory=dict)
    document: str = "README.md"  # its path from the repository's root

    @property
    def label(self) -> str:
        name = self.options.get("name")
        return f"{self.document}:{self.line} ({self.kind}{' ' + name if name else ''})"

    @property
    def key(self) -> tuple:
        """What makes two run blocks the same example: their commands and options (not the
        output they show, which is compared each time)."""
        options = {k: v for k, v in self.options.items() if k != "name"}
        commands = tuple(line for line in self.body if not line.strip().startswith("#"))
        return (self.kind, self.lang, commands, tuple(sorted(options.items())))


def documents() -> list[Path]:
    """README.md, then every Markdown page of the site in the order of docs/index.md's
    toctrees (the site's navigation; generated pages and notebooks have no examples)."""
    found = [README]
    if not (DOCS / "index.md").is_file():
        return found
    found.append(DOCS / "index.md")
    lines = (DOCS / "index.md").read_text("utf-8").split("\n")
    inside = False
    for line in lines:
        if TOCTREE.match(line.strip()):
            inside = True
        elif inside and line.startswith("```"):
            inside = False
        elif inside and line.strip() and not line.startswith(":"):
            page = DOCS / f"{line.strip()}.md"
            if page.is_file() and page not in found and not _generated(page):
                found.append(page)
    return found


def _generated(page: Path) -> bool:
    """A page the site's build writes from the code (docs/_ext): no examples to run."""
    return page.read_text("utf-8").startswith("<!-- generated by")


def all_blocks() -> list[Block]:
    """The blocks of every document, in reading order."""
    found = []
    for path in documents():
        for block in blocks(path.read_text("utf-8")):
            block.document = str(path.relative_to(ROOT))
            found.append(block)
    return found


def blocks(text: str) -> list[Block]:
    """Every fenced block of `text` with the check comment before it (kind None: none)."""
    lines = text.split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            match = COMMENT.match(before.strip())
            kind, options = (match.group(1), _options(match.group(2))) if match else (None, {})
            if not lang.startswith("{"):  # ```{toctree} and other MyST directives: no example
                found.append(Block(start + 1, lang, lines[start + 1 : end], kind, options))
            i = end + 1
        else:
            i += 1
    return found


def _options(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(text))


# ---- matching ------------------------------------------------------------------------------


def normalize(line: str) -> str:
    line = re.sub(r"[━─═]+", "━", line.replace("\u00a0", " "))
    return re.sub(r"\s+", " ", line).strip()


def pattern(shown: str, numbers: bool) -> re.Pattern[str]:
    parts = re.split(r"…|\.\.\.", normalize(shown))
    pieces = []
    for part in parts:
        if numbers:
            bits = re.split(f"({NUMBER})", part)
            pieces.append(
                "".join(NUMBER if k % 2 else re.escape(bit) for k, bit in enumerate(bits))
            )
        else:
            pieces.append(re.escape(part))
    return re.compile(".*".join(pieces))


def check_shown(shown: list[str], printed: str, numbers: bool = False) -> str | None:
    """None when every shown line matches a printed line, in order; else what is missing."""
    actual = [normalize(line) for line in printed.splitlines()]
    position = 0
    for line in shown:
        if not normalize(line) or normalize(line) in ("…", "..."):
            continue
        regex = pattern(line, numbers)
        hit = next((k for k in range(position, len(actual)) if regex.fullmatch(actual[k])), None)
        if hit is None:
            near = "\n".join(f"    | {a}" for a in actual[position : position + 12])
            return f"shown line not printed (in order):\n    {line.strip()}\nprinted next:\n{near}"
        position = hit + 1
    return None


def shown_output(body: list[str]) -> list[str]:
    """The `# ` lines right after a command line (and after each other) in a run block."""
    shown: list[str] = []
    after_command = False
    for line in body:
        stripped = line.strip()
        if stripped.startswith("#"):
            if after_command:
                shown.append(stripped[1:].strip())
            continue
        after_command = bool(stripped) and not stripped.endswith("\\")
        if stripped.endswith("\\"):
            after_command = False
    return shown


# ---- running -------------------------------------------------------------------------------


@dataclass
class Sandbox:
    repo: Path
    home: Path
    outputs: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)  # `M=…` lines of earlier blocks
    ran: dict[tuple, str] = field(default_factory=dict)  # a run block's key → what it printed
    lane: str = ""  # printed before each line of this lane
    leave_long: bool = False  # `--leave-long`: blocks marked `long=REASON` are not run
    left: set[str] = field(default_factory=set)  # names of the long blocks left out

    def fork(self, lane: str) -> Sandbox:
        """A lane of its own in the same sandbox: what ran so far, copied."""
        return Sandbox(self.repo, self.home, dict(self.outputs), [], list(self.variables),
                       dict(self.ran), lane, self.leave_long, set(self.left))  # fmt: skip

    def say(self, text: str) -> None:
        print(f"{self.lane}{text}", file=sys.stderr, flush=True)

    @classmethod
    def create(cls, where: Path) -> Sandbox:
        """A copy of the repository's tracked files (as a clone has them), this venv
        linked in, and an empty HOME."""
        repo, home = where / "muestra", where / "home"
        home.mkdir(parents=True, exist_ok=True)
        files = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.split(b"\0")
        for name in filter(None, files):
            source = ROOT / name.decode()
            if source.is_file():
                target = repo / name.decode()
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        (repo / ".venv").symlink_to(ROOT / ".venv")
        # The linked venv is the one `make readme` just brought up to date: a `make` target
        # run in the sandbox (`make demo`) must not reinstall into it (an editable install
        # would then point the venv at this temporary copy). The copies' mtimes say so.
        stamp = ROOT / ".venv" / ".muestra-installed"
        if stamp.exists():
            for name in ("pyproject.toml", "constraints.txt"):
                if (repo / name).exists():
                    os.utime(repo / name, ns=(stamp.stat().st_mtime_ns - 10**9,) * 2)
        return cls(repo, home)

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("MUESTRA_", "PYTEST"))}
        return {
            **keep,
            "HOME": str(self.home),
            "PATH": f"{self.repo / '.venv' / 'bin'}:{keep.get('PATH', '')}",
            "COLUMNS": "1000",  # rich wraps at the width: README shows whole lines
            "TERM": "dumb",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }

    def shell(self, source: str, extra: dict[str, str], timeout: float) -> tuple[int, str]:
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", source],
            cwd=self.repo,
            env=self.env(extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.say(f"    ran in {time.monotonic() - started:.0f} s: {source.strip()[:90]}")
        return done.returncode, done.stdout + done.stderr

    def start_server(self, line: str, extra: dict[str, str]) -> None:
        """`muestra serve … &`: started here, kept for the next blocks, up once /health
        answers."""
        import urllib.request

        self.stop_servers()
        log = open(self.repo / f"server-{len(self.outputs)}.log", "w")  # noqa: SIM115
        self.servers.append(
            subprocess.Popen(
                ["bash", "-c", "exec " + line.rstrip().rstrip("&")],
                cwd=self.repo,
                env=self.env(extra),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.servers[-1].poll() is not None:
                raise RuntimeError(f"the server stopped: see {log.name}")
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the server did not answer /health in 300 s: see {log.name}")

    def stop_servers(self) -> None:
        for server in self.servers:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        self.servers.clear()

    def run(self, block: Block) -> str | None:
        """Run or check `block`; None when it holds, else why not."""
        options = block.options
        numbers = options.get("match") == "numbers"
        extra = dict(part.split("=", 1) for part in shlex.split(options.get("env", "")))
        timeout = float(options.get("timeout", 1800))
        if self.leave_long and "long" in options and block.kind in ("run", "session"):
            self.left.add(options.get("name", ""))
            self.say(f"    long, left out: {options['long']}")
            return None
        if block.kind == "output" and options.get("name") in self.left:
            return None  # what a long block left out printed
        if block.kind == "session":
            commands: list[tuple[str, list[str]]] = []
            for line in block.body:
                if line.startswith("$ "):
                    commands.append((line[2:], []))
                elif commands and not line.startswith("# "):
                    commands[-1][1].append(line)
            for command, shown in commands:
                code, printed = self.shell(command, extra, timeout)
                if code != 0:
                    return f"`{command}` exited {code}\n{printed[-3000:]}"
                why = check_shown(shown, printed, numbers)
                if why is not None:
                    return f"`{command}`: {why}"
            return None
        if block.kind == "skip":
            return None if options.get("reason") else "skip needs a reason"
        if block.kind == "file":
            lines = set((self.repo / options["path"]).read_text("utf-8").splitlines())
            missing = [line for line in block.body if line and line not in lines]
            return f"lines not in {options['path']}: {missing[:3]}" if missing else None
        if block.kind == "output":
            name = options["name"]
            if name not in self.outputs and "command" in options:
                code, self.outputs[name] = self.shell(options["command"], extra, timeout)
                if code != 0:
                    return f"`{options['command']}` exited {code}\n{self.outputs[name][-3000:]}"
            printed = self.outputs.get(name)
            if printed is None:
                return f"no block named {name!r} ran before this one"
            optional = options.get("optional")
            shown = [
                line
                for line in block.body
                if not line.startswith(("$ ", "# "))
                and not (optional and line.startswith(optional))
            ]
            return check_shown(shown, printed, numbers)
        if block.kind != "run":
            return "no `<!-- check: … -->` comment before this block (see tests/readme_check.py)"
        if block.key in self.ran:  # the same example shown again: compare, do not rerun
            printed = self.ran[block.key]
            if "name" in options:
                self.outputs[options["name"]] = printed
            self.say(f"    already ran: {' '.join(block.body)[:90]}")
            return check_shown(shown_output(block.body), printed, numbers)
        body = []
        for line in block.body:
            if line.startswith("muestra serve ") and line.rstrip().endswith("&"):
                self.start_server(line, extra)
            else:
                body.append(line)
        # one shell for all the documents, as a reader has: variables set by earlier blocks
        source = "\n".join([*self.variables, *body]) + "\n"
        if block.lang != "python":
            self.variables += [line for line in body if ASSIGNMENT.match(line)]
        if block.lang == "python":
            python = self.repo / ".venv" / "bin" / "python"
            source = f"{python} - <<'PYTHON'\n" + "\n".join(body) + "\nPYTHON\n"
        code, printed = self.shell(source, extra, timeout)
        if "name" in options:
            self.outputs[options["name"]] = printed
        self.ran[block.key] = printed
        if (code != 0) != (options.get("expect") == "fail"):
            tail = "\n".join(printed.splitlines()[-25:])
            return f"exit {code}\n{tail}"
        return check_shown(shown_output(block.body), printed, numbers)


def lanes() -> dict[str, int]:
    """Each document's lane: 0 (alone, first), then 1, 2, … (at once): those of `LANES`,
    and the last for every other page."""
    where = {str(path.relative_to(ROOT)): k for k, path in enumerate(documents())}
    own = {doc: k for k, pages in enumerate(LANES, start=1) for doc in pages}
    return {
        doc: 0 if k < where[PARALLEL_FROM] else own.get(doc, len(LANES) + 1)
        for doc, k in where.items()
    }


def check_lane(sandbox: Sandbox, todo: list[Block], failures: list[str]) -> None:
    """Run or check `todo` in order in `sandbox`, adding what fails to `failures`."""
    for block in todo:
        try:
            why = sandbox.run(block)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            why = str(err)
        sandbox.say(f"{'ok' if why is None else 'FAILED':6s} {block.label}")
        if why is not None:
            failures.append(f"{block.label}: {why}")
    sandbox.stop_servers()


def main(argv: list[str]) -> int:
    """`python tests/readme_check.py [WORKDIR] [--only DOC:LINE,...] [--list]`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", type=Path)
    parser.add_argument(
        "--only", default="", help="blocks to run: README.md:LINE,docs/x.md:LINE (LINE: README's)"
    )
    parser.add_argument("--list", action="store_true", help="list the blocks, run nothing")
    parser.add_argument(
        "--leave-long", action="store_true",
        help="do not run the blocks marked long=REASON, nor check their outputs (CI)",
    )  # fmt: skip
    arguments = parser.parse_args(argv)
    if arguments.list:
        for block in all_blocks():
            print(f"{block.document}:{block.line} {block.kind} {' '.join(block.body)[:80]}")
        return 0
    import tempfile

    workdir = arguments.workdir or Path(tempfile.mkdtemp(prefix="muestra-readme-"))
    sandbox = (
        Sandbox.create(workdir)
        if not (workdir / "muestra").exists()
        else Sandbox(workdir / "muestra", workdir / "home")
    )
    sandbox.leave_long = arguments.leave_long
    only = {x if ":" in x else f"README.md:{x}" for x in arguments.only.split(",") if x}
    chosen = [b for b in all_blocks() if not only or f"{b.document}:{b.line}" in only]
    lane = lanes()
    failures: list[str] = []
    check_lane(sandbox, [b for b in chosen if lane[b.document] == 0], failures)
    from concurrent.futures import ThreadPoolExecutor

    at_once = range(1, len(LANES) + 2)
    with ThreadPoolExecutor(len(at_once)) as pool:
        running = [
            pool.submit(check_lane, sandbox.fork(f"[lane {k}] "),
                        [b for b in chosen if lane[b.document] == k], failures)
            for k in at_once
        ]  # fmt: skip
        for done in running:
            done.result()
    for failure in failures:
        print(f"\n{failure}", file=sys.stderr)
    print(f"\n{len(failures)} block(s) failed (sandbox: {workdir})", file=sys.stderr)
    if not failures and arguments.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # kept only when asked for, or to look at
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
