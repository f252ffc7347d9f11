#!/usr/bin/env bash
# Scoring kernels at Qwen2-VL-7B dims (bf16, N=32000 unless N is set): Nsight Compute's pipe utilisation,
# shared-memory traffic, warp states and scheduler statistics of each pass, as text under $OUT (after an
# in-place sm_90 build). GPU only. PASSES: kernel-name prefixes (default pass1 pass2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
cat >/tmp/score_pipes_once.py <<PY
import torch
from mixkv.ops import compute_scores
torch.manual_seed(0)
q = torch.randn(1, 28, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 4, ${N:-32000}, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 4, ${N:-32000}, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    compute_scores(q, k, v, method="mixkv", pooling="avg", kernel_size=5, gqa="mean", validate=False)
torch.cuda.synchronize()
PY
for pass in ${PASSES:-pass1 pass2}; do
  PYTHONPATH=python ncu --kernel-name "regex:${pass}_(wg)?mma" --launch-skip 2 --launch-count 1 \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section SchedulerStats --section SpeedOfLight --section InstructionStats \
    --metrics sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_shfl.sum \
    python3 /tmp/score_pipes_once.py >"$OUT/pipes_$pass.txt" 2>&1
  grep -E "Duration|Throughput|Pipe|pipe_|Stall|Issued|Eligible|Active Warps|Bank|shared|Shared|No Eligible|shfl" "$OUT/pipes_$pass.txt" | head -60
done
