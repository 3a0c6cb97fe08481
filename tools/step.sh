#!/usr/bin/env bash
# `tools/step.sh "what" command…`: print what is starting, run it, print how long it took
# (make install and make test-long show their steps this way).
set -uo pipefail
label=$1; shift
printf '==> %s\n' "$label"
start=$(date +%s)
"$@"; code=$?
elapsed=$(( $(date +%s) - start ))
if [ "$code" -ne 0 ]; then
  printf '==> %s: FAILED after %dm%02ds (exit %d)\n' "$label" $((elapsed / 60)) $((elapsed % 60)) "$code"
  exit "$code"
fi
printf '    done in %dm%02ds\n' $((elapsed / 60)) $((elapsed % 60))
