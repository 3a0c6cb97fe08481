# muestra — two commands on a fresh clone: `make demo` and `make test`.
# Both create .venv when absent and install torch (CPU build, pinned in
# constraints.txt) and the package with its dev extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MUESTRA := $(VENV)/bin/muestra
STAMP := $(VENV)/.muestra-installed
KIT ?= $(HOME)/.cache/muestra/kit

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(STAMP)
	$(PY) -m muestra.demo --kit-dir $(KIT)

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
