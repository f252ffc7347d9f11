#!/usr/bin/env bash
# Scoring-kernel development loop on the GPU, one call: in-place sm_90a build, the CUDA scoring tests,
# profile_score (two interleaved repeats), the ncu hot spots and compute-sanitizer. Results under $OUT.
# STAMPS=1: instead, a -DMIXKV_STAMPS build and the phase timeline of scripts/stamps_score.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=python
t0=$(date +%s)
lap() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
flags=""; [ "${STAMPS:-0}" = 1 ] && flags="-DMIXKV_STAMPS"
cmake -S . -B build -G Ninja -DMIXKV_CUDA=ON -DMIXKV_CUDA_ARCHS=90a-real -DMIXKV_DEV_INPLACE=ON -DMIXKV_BUILD_TESTS=OFF \
  -DCMAKE_CUDA_FLAGS="$flags" -DPython_EXECUTABLE="$(which python3)" >"$OUT/build.log" 2>&1 \
  && cmake --build build -j16 >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
lap build
if [ "${STAMPS:-0}" = 1 ]; then
  timeout 300 python3 scripts/stamps_score.py ${LENGTHS:-2048 32000} | tee "$OUT/stamps.txt"
  exit 0
fi
timeout 240 python3 -m pytest tests/test_scores.py -m cuda -q -x -o addopts="" -p no:cacheprovider 2>&1 | tail -6
lap tests
timeout 150 python3 benchmarks/profile_score.py --repeats "${REPEATS:-2}" ${VARIANTS:+--variants $VARIANTS} 2>&1 | grep -v Warn | tee "$OUT/profile_score.txt"
lap profile
[ "${HOTSPOTS:-1}" = 1 ] && { bash scripts/score_hotspots.sh 2>&1 | grep -E "source rows|ERR"; lap hotspots; }
if [ "${SANITIZE:-1}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_kernels.py >"$OUT/san_$tool.log" 2>&1
    echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/san_$tool.log" | tail -1)"
  done
  lap sanitize
fi
