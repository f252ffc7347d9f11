#!/usr/bin/env bash
# One call on a GPU machine: build for sm_90a, run the CUDA tests, compute-sanitizer and benchmarks.
# Results (logs, JSON, summary) go under $OUT. Usage: bash scripts/gpu_run.sh [stage ...]
# stages: build test sanitize probe wgmma_probe wgmma_rate bench e2e e2e_short mixcost (default: build test sanitize
# bench);
# e2e_short and mixcost take MODEL=llava|qwen|internvl and need most of one 10-minute call each
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
stages=${*:-build test sanitize bench}
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" >>"$summary"; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

note "== device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
note "== torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)') transformers $($PY -c 'import transformers; print(transformers.__version__)')"

for stage in $stages; do
  t0=$(date +%s)
  case $stage in
    build)
      MIXKV_CUDA=ON MIXKV_CUDA_ARCHS=90a-real CMAKE_BUILD_PARALLEL_LEVEL=16 \
        $PY -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1
      rc=$?
      note "build rc=$rc ($(( $(date +%s) - t0 )) s); cuda_available=$($PY -c 'import mixkv; print(mixkv.cuda_available())' 2>&1 | tail -1)"
      [ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; cat "$summary"; exit 1; }
      ;;
    test)
      # one process per file: a device fault in one file cannot poison the others' CUDA context
      fails=0
      for f in tests/test_*.py; do
        name=$(basename "$f" .py)
        (cd tests && MIXKV_HYPOTHESIS_PROFILE=gpu timeout 300 $PY -m pytest -p no:cacheprovider -q -m cuda \
          -o addopts="" "$name.py" >"/tmp/pytest_$name.log" 2>&1)
        rc=$?
        { echo "=== $name rc=$rc"; cat "/tmp/pytest_$name.log"; } >>"$OUT/pytest_cuda.log"
        [ $rc -eq 0 ] || [ $rc -eq 5 ] || fails=$((fails + 1))
        note "  $name rc=$rc: $(tail -1 "/tmp/pytest_$name.log")"
        grep -E "^(FAILED|ERROR)" "/tmp/pytest_$name.log" | head -5 >>"$summary"
      done
      rm -f "$OUT/pytest_cuda.xml"
      note "pytest -m cuda: $fails file(s) failing ($(( $(date +%s) - t0 )) s)"
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 --target-processes all \
          $PY scripts/sanitize_kernels.py >"$OUT/sanitize_$tool.log" 2>&1
        note "compute-sanitizer $tool rc=$? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
        grep "FAILED" "$OUT/sanitize_$tool.log" | head -8 >>"$summary"
      done
      ;;
    probe)
      # can this environment launch a cluster kernel at all, natively and under compute-sanitizer?
      nvcc -std=c++17 -arch=sm_90 -o /tmp/cluster_probe scripts/cluster_probe.cu >"$OUT/probe.log" 2>&1
      { echo "--- native"; /tmp/cluster_probe; echo "--- memcheck"; compute-sanitizer --tool memcheck /tmp/cluster_probe;
        echo "--- racecheck"; compute-sanitizer --tool racecheck /tmp/cluster_probe; } >>"$OUT/probe.log" 2>&1
      grep -E "^(---|runtime|compile)|ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/probe.log" >>"$summary"
      ;;
    wgmma_probe)
      # the warpgroup-MMA descriptors and fragment layout of cuda/wgmma.cuh against a host reference
      nvcc -std=c++17 -arch=sm_90a -Icuda -Icpp/include -o /tmp/wgmma_probe scripts/wgmma_probe.cu >"$OUT/wgmma_probe.log" 2>&1 \
        && /tmp/wgmma_probe >>"$OUT/wgmma_probe.log" 2>&1
      note "wgmma_probe rc=$?: $(tail -1 "$OUT/wgmma_probe.log")"
      ;;
    wgmma_rate)
      # tensor-core rate of the scoring passes' logit shapes (cycles per 64-key tile of 256 rows)
      python3 scripts/gen_wgmma.py --extra 128 256 --out /tmp/wgmma_extra.cuh \
        && nvcc -std=c++17 -arch=sm_90a -Icuda -Icpp/include -I/tmp -o /tmp/wgmma_rate scripts/wgmma_rate.cu \
          >"$OUT/wgmma_rate.log" 2>&1 && /tmp/wgmma_rate >>"$OUT/wgmma_rate.log" 2>&1
      note "wgmma_rate rc=$?"; grep -E "cycles/tile" "$OUT/wgmma_rate.log" >>"$OUT/summary.txt"
      ;;
    bench)
      for b in benchmarks/bench_*.py; do
        name=$(basename "$b" .py)
        timeout 300 $PY "$b" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
        note "$name rc=$?"
        tail -40 "$OUT/$name.log" >>"$summary"
      done
      ;;
    e2e)
      timeout 400 $PY scripts/gpu_e2e.py --out "$OUT/gpu_e2e.json" >"$OUT/gpu_e2e.log" 2>&1
      note "gpu_e2e rc=$? ($(( $(date +%s) - t0 )) s)"
      tail -12 "$OUT/gpu_e2e.log" >>"$summary"
      ;;
    e2e_short)
      # 2,000- and 8,000-token end-to-end runs of one model (MODEL=llava|qwen|internvl), all nine methods
      m=${MODEL:-llava}
      timeout 560 $PY -m mixkv.bench --models "$m" --lengths 2000 8000 --parts e2e --no-progress \
        --out-dir "$OUT/e2e_short_$m" >"$OUT/e2e_short_$m.log" 2>&1
      note "e2e_short $m rc=$? ($(( $(date +%s) - t0 )) s)"
      grep -E "^\[e2e\]|mixkv cost" "$OUT/e2e_short_$m.log" | tail -20 >>"$summary"
      ;;
    mixcost)
      # what MixKV adds to each policy at 32k (MODEL=...): 512-token totals, then interleaved prefill rounds
      m=${MODEL:-qwen}
      timeout 560 $PY -m mixkv.bench --models "$m" --lengths 32000 --parts e2e mixcost memory --no-warm-full \
        --methods snapkv snapkv+mixkv pyramidkv pyramidkv+mixkv adakv adakv+mixkv sparsemm sparsemm+mixkv \
        --mix-cost-rounds 5 --no-progress --out-dir "$OUT/mixcost_$m" >"$OUT/mixcost_$m.log" 2>&1
      note "mixcost $m rc=$? ($(( $(date +%s) - t0 )) s)"
      grep -E "^\[(mixcost|memory)\]" "$OUT/mixcost_$m.log" | tail -12 >>"$summary"
      ;;
    *)
      note "unknown stage $stage"
      ;;
  esac
done
cat "$summary"
