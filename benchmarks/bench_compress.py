"""One layer's prefill compression (scores + capacities + select) on the GPU, against its floor.

Qwen2-VL-7B attention dims (Hq 28, Hkv 4, D 128, W 32), bf16, B = 1. For every prompt length,
budget and policy (SnapKV, AdaKV, each with and without MixKV) it reports the device time of the
whole step (median of CUDA-graph replays), the eager wall time (Python included), the floor
(bytes of K and V read once over the measured copy bandwidth), the target 2 x floor + 15 us, and
the per-head-loop PyTorch implementation on the same tensors. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
from pathlib import Path

import torch

from mixkv.bench.compress import make_step
from mixkv.bench.loop_reference import loop_compress
from mixkv.bench.timing import copy_bandwidth, median_eager_ms, median_graph_ms

HQ, HKV, DIM, WINDOW, LAYERS = 28, 4, 128, 32, 28


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_compress.json"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32000])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--loop-reps", type=int, default=5)
    args = parser.parse_args()

    import mixkv

    if not (torch.cuda.is_available() and mixkv.cuda_available()):
        print("bench_compress: no CUDA device (or a build without kernels). Plan on a GPU:")
        print(f"  lengths {args.lengths}, budgets {args.budgets}, snapkv/adakv x mix on/off,")
        print(f"  bf16, Hq {HQ}, Hkv {HKV}, D {DIM}, W {WINDOW}; graph-replay medians vs floor")
        return 0

    device = torch.device("cuda")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    rows = []
    for n in args.lengths:
        q = torch.randn(1, HQ, WINDOW, DIM, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, n, DIM, device=device, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, n, DIM, device=device, dtype=torch.bfloat16)
        floor_us = (k.numel() + v.numel()) * k.element_size() / bandwidth * 1e6
        for budget in args.budgets:
            for policy in ("snapkv", "adakv"):
                for mix in (False, True):
                    step = make_step(q, k, v, policy=policy, mix=mix, budget=budget, layers=LAYERS)
                    graph_us = median_graph_ms(step, reps=50, inner=10) * 1e3
                    eager_us = median_eager_ms(step, device, reps=50) * 1e3
                    loop_us = 1e3 * median_eager_ms(
                        functools.partial(loop_compress, q, k, v, policy=policy, mix=mix, budget=budget),
                        device,
                        reps=args.loop_reps,
                    )
                    target = 2 * floor_us + 15
                    rows.append(
                        {
                            "n": n,
                            "budget": budget,
                            "policy": policy,
                            "mix": mix,
                            "device_us": graph_us,
                            "eager_us": eager_us,
                            "loop_us": loop_us,
                            "floor_us": floor_us,
                            "target_us": target,
                            "meets_target": graph_us <= target,
                            "speedup_vs_loop": loop_us / graph_us,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"N={n:>6} budget={budget:>4} {policy:>6}{'+mix' if mix else '    '} "
                        f"device {graph_us:8.1f} us  eager {eager_us:8.1f} us  floor {floor_us:6.1f}  "
                        f"target {target:6.1f} {'OK ' if r['meets_target'] else 'MISS'}  "
                        f"loop {loop_us / 1e3:7.2f} ms  x{r['speedup_vs_loop']:.0f}",
                        flush=True,
                    )
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "mixkv": mixkv.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "python": platform.python_version(),
        "dims": {"Hq": HQ, "Hkv": HKV, "D": DIM, "W": WINDOW, "dtype": "bfloat16", "B": 1},
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {meta['device']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
