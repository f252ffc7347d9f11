#!/usr/bin/env bash
# A/B of the CUDA sources on the GPU in one call: builds the working tree and a reference tree whose
# cuda/ (and every other directory ab_ref holds: cpp/, python/ ...) comes from ab_ref (e.g. `git archive
# HEAD cuda | tar -x -C ab_ref`), both in place for
# sm_90a in parallel, runs the scoring CUDA tests (or those of TESTS) on the working tree, then profile_score (and with
# BENCH=1 bench_compress) on both, interleaved REPEATS times. Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d ab_ref/cuda ] || { echo "ab_ref/cuda missing"; exit 2; }
ref=/tmp/ab_ref_tree
rm -rf "$ref" && mkdir -p "$ref"
tar --exclude=./build --exclude=./ab_ref --exclude=./.git -cf - . | tar -xf - -C "$ref"
for d in ab_ref/*/; do name=$(basename "$d"); rm -rf "${ref:?}/$name" && cp -r "$d" "$ref/$name"; done
build() {
  (cd "$1" && cmake -S . -B build -G Ninja -DMIXKV_CUDA=ON -DMIXKV_CUDA_ARCHS=90a-real -DMIXKV_DEV_INPLACE=ON \
    -DMIXKV_BUILD_TESTS=OFF -DPython_EXECUTABLE="$(which python3)" >"$2" 2>&1 && cmake --build build -j8 >>"$2" 2>&1) \
    || { tail -20 "$2"; return 1; }
}
t0=$(date +%s)
build . "$OUT/build_new.log" & pn=$!
build "$ref" "$OUT/build_ref.log" & pr=$!
wait $pn || exit 1
wait $pr || exit 1
echo "[$(( $(date +%s) - t0 )) s] built"
PYTHONPATH=python timeout 300 python3 -m pytest ${TESTS:-tests/test_scores.py} -m cuda -q -x -o addopts="" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests_new.txt" | tail -3
for r in $(seq "${REPEATS:-2}"); do
  for side in new ref; do
    path=$PWD/python; [ "$side" = ref ] && path=$ref/python
    echo "## $side (round $r)"
    PYTHONPATH=$path timeout 200 python3 benchmarks/profile_score.py ${VARIANTS:+--variants $VARIANTS} 2>&1 | grep -v -i warn | tee -a "$OUT/profile_$side.txt"
    if [ "${BENCH:-0}" = 1 ]; then
      PYTHONPATH=$path timeout 200 python3 benchmarks/bench_compress.py --budgets 64 --loop-reps 1 --out "$OUT/bench_${side}_$r.json" 2>&1 \
        | grep -E "snapkv|adakv" | tee -a "$OUT/bench_$side.txt"
    fi
  done
done
if [ "${TIMELINE:-0}" = 1 ]; then
  PYTHONPATH=python timeout 120 python3 benchmarks/profile_compress.py --timeline --out "$OUT/timeline_new.json" 2>&1 | grep -v -i warn | tail -40
fi
echo "[$(( $(date +%s) - t0 )) s] done"
