"""Scoring kernels alone (Qwen2-VL-7B dims, bf16, mixkv): CUDA-graph device time and per-kernel device time.

Variants (``--variants name:KEY=V,KEY=V``) set environment variables around their measurements, for
tuning switches a build under study reads at each call; every variant's scores are compared with
the first variant's. ``--repeats R`` measures the variants R times, interleaved, e.g.

    python benchmarks/profile_score.py --repeats 2 --variants default: \
        slabs1:MIXKV_SCORE_SLABS=1 slabs2:MIXKV_SCORE_SLABS=2 slabs3:MIXKV_SCORE_SLABS=3
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from mixkv.bench.timing import device_us_by_kernel, median_graph_ms
from mixkv.ops import compute_scores


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, env


def short(name: str) -> str:
    m = re.search(r"(\w+_kernel)", name)
    return m.group(1).replace("_kernel", "") if m else name[:24]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32000])
    parser.add_argument("--variants", nargs="+", default=["default:"])
    parser.add_argument("--importance", action="store_true", help="also write the importance (AdaKV)")
    parser.add_argument("--repeats", type=int, default=1, help="measure every variant this many times, interleaved")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_score: no CUDA device")
        return 0
    torch.manual_seed(0)
    for n in args.lengths:
        q = torch.randn(1, 28, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)

        def step(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            res = compute_scores(
                q,
                k,
                v,
                method="mixkv",
                pooling="avg",
                kernel_size=5,
                gqa="mean",
                need_importance=args.importance,
                validate=False,
            )
            return res.scores

        first: torch.Tensor | None = None
        for text in args.variants * max(1, args.repeats):
            name, env = parse_variant(text)
            saved = {key: os.environ.get(key) for key in env}
            os.environ.update(env)
            try:
                out = step().clone()
                diff = 0.0 if first is None else float(((out - first).abs() / first.abs().amax()).max())
                first = out if first is None else first
                graph_us = median_graph_ms(step, reps=30) * 1e3
                parts = [f"{short(key)} {us:.1f}" for key, us, _ in device_us_by_kernel(step)]
                print(f"N={n:6d} {name:12s} graph {graph_us:7.1f} us | diff {diff:.1e} | " + ", ".join(parts))
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
