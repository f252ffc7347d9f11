"""Per-kernel device time of the compression step (torch profiler), Qwen2-VL-7B dims, bf16."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mixkv.bench.compress import make_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 32000])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_compress: no CUDA device")
        return 0
    for n in args.lengths:
        q = torch.randn(1, 28, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
        for policy, mix in (("snapkv", True), ("adakv", True)):
            step = make_step(q, k, v, policy=policy, mix=mix, budget=64, layers=28)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            print(f"== N={n} {policy}+mix (device us per step, by kernel)")
            for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
                if ev.device_time_total > 0:
                    print(f"  {ev.device_time_total / 10:9.1f}  x{ev.count // 10:<3} {ev.key[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
