#!/usr/bin/env bash
# The test command: C++ unit tests (ctest, CPU twins) then the Python suite (pytest).
# Expects mixkv installed in the active Python (pip install ".[test]").
# Extra arguments go to pytest (e.g. -m cuda on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
build=${MIXKV_CTEST_BUILD_DIR:-build/ctest}
cmake -S . -B "$build" -DMIXKV_CUDA=OFF -DMIXKV_BUILD_TESTS=ON -DMIXKV_BUILD_PYTHON=OFF \
      -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "${MIXKV_BUILD_JOBS:-2}"
ctest --test-dir "$build" --output-on-failure
# Run pytest from outside the source tree so the installed package (with its extension) is imported.
cd tests
"$PY" -m pytest -p no:cacheprovider "$@"
