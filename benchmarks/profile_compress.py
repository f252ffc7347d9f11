"""Per-kernel device time of the compression step (torch profiler), Qwen2-VL-7B dims, bf16."""

from __future__ import annotations

import argparse

import torch

from mixkv.bench.compress import make_step
from mixkv.bench.timing import device_us_by_kernel


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
            print(f"== N={n} {policy}+mix (device us per step, by kernel)")
            for key, us, count in device_us_by_kernel(step):
                print(f"  {us:9.1f}  x{count:<3} {key[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
