#!/usr/bin/env bash
# Scoring kernels at Qwen2-VL-7B dims (bf16, N=32000): SASS of the tensor-core passes and Nsight Compute's
# per-instruction warp-state samples, for finding where a pass spends its cycles. GPU only; results under $OUT.
# Usage (after an in-place sm_90 build, see benchmarks/NOTES_score.md): bash scripts/score_hotspots.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
so=$(ls python/mixkv/_core*.so | head -1)
cuobjdump -sass "$so" | awk '/Function :/ {keep = ($0 ~ /pass[12]_(mma|wgmma)_kernel/ && $0 ~ /bfloat/ && $0 ~ /Li128ELi4E|Li224E|wgmma_kernelI13__nv_bfloat16Li4E/)} keep' \
  | gzip >"$OUT/score_sass.txt.gz"
cat >/tmp/score_once.py <<'PY'
import torch
from mixkv.ops import compute_scores
torch.manual_seed(0)
q = torch.randn(1, 28, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 4, 32000, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 4, 32000, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    compute_scores(q, k, v, method="mixkv", pooling="avg", kernel_size=5, gqa="mean", validate=False)
torch.cuda.synchronize()
PY
# PASSES: kernel-name prefixes to profile (default both passes, either tensor-core variant)
for pass in ${PASSES:-pass1 pass2}; do
  PYTHONPATH=python ncu --kernel-name "regex:${pass}_(wg)?mma" --launch-skip 2 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section Occupancy -o "/tmp/$pass" -f python3 /tmp/score_once.py >"/tmp/ncu_$pass.log" 2>&1
  tail -3 "/tmp/ncu_$pass.log"
  ncu -i "/tmp/$pass.ncu-rep" --print-details all >"$OUT/${pass}_details.txt" 2>&1
  ncu -i "/tmp/$pass.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip >"$OUT/${pass}_source.csv.gz"
  echo "$pass: $(zcat "$OUT/${pass}_source.csv.gz" | wc -l) source rows"
done
