"""Phase timeline of the warpgroup scoring passes from a -DMIXKV_STAMPS build (see cuda/stamps.cuh).

Runs three scoring calls per length (Qwen2-VL-7B dims, bf16, mixkv) in a child process and reads the
lines the kernels print for the last call: per kernel and warpgroup, the spread of block start and end
times (us from the first block's start) and for every stamped point its median time since the block's
start and the median / largest step from the point before. The printing itself delays the kernels that
follow, so waits on an earlier kernel (pass 2's dependency wait) read long; steps inside a block do not.
Usage (on the GPU): `STAMPS=1 bash scripts/score_dev.sh` or `python scripts/stamps_score.py 2048 32000`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, torch
from mixkv.ops import compute_scores
n = int(sys.argv[1])
torch.manual_seed(0)
q = torch.randn(1, 28, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
for i in range(3):
    compute_scores(q, k, v, method="mixkv", pooling="avg", kernel_size=5, gqa="mean", validate=False)
    torch.cuda.synchronize()
    print(f"=== call {i}", flush=True)
"""

CLOCK_GHZ = 1.98  # H100 SXM boost clock: cycles to us


def parse(text: str) -> list[tuple[str, int, int, int, list[int]]]:
    """(tag, extra, g0 ns, g_last ns, cycles since point 0 per point) of every line of the last call."""
    calls = text.split("=== call")
    last = calls[-2] if len(calls) >= 2 else text
    rows = []
    for line in last.splitlines():
        head, sep, tail = line.partition(" : ")
        h = head.split()
        if not sep or len(h) < 7 or h[0][:2] not in ("P1", "P2", "FI"):
            continue
        rows.append((h[0], int(h[4]), int(h[5]), int(h[6]), [int(x) for x in tail.split()]))
    return rows


def summarize(rows: list[tuple[str, int, int, int, list[int]]]) -> None:
    t0 = min(r[2] for r in rows)
    us = CLOCK_GHZ * 1e3
    for tag in sorted({r[0] for r in rows}):
        rs = [r for r in rows if r[0] == tag]
        starts = sorted((r[2] - t0) / 1e3 for r in rs)
        ends = sorted((r[3] - t0) / 1e3 for r in rs)
        tiles = statistics.median(r[1] for r in rs)
        print(
            f"{tag}: blocks {len(rs)}, tiles {tiles}, start {starts[0]:.2f}..{starts[-1]:.2f} us, "
            f"end {ends[0]:.2f}..{ends[-1]:.2f} us"
        )
        for i in range(len(rs[0][4])):
            pairs = [(r[4][i], r[4][i - 1] if i > 0 else 0) for r in rs if r[4][i] >= 0]
            if not pairs:
                continue
            steps = [(v - p) / us for v, p in pairs]
            at = statistics.median(v for v, _ in pairs) / us
            print(
                f"   point {i + 1}: at {at:6.2f} us (median), step median {statistics.median(steps):6.2f} "
                f"max {max(steps):6.2f} us"
            )


def main() -> int:
    lengths = [int(x) for x in sys.argv[1:]] or [2048, 8192, 32000]
    for n in lengths:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, env=os.environ)
        print(f"## N={n}")
        rows = parse(out.stdout)
        if rows:
            summarize(rows)
        else:
            print("no stamps (a build without -DMIXKV_STAMPS?)")
        if out.returncode != 0:
            print(out.stderr[-2000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
