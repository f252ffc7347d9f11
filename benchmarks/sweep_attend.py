"""Sweep of the attention split policy (CUDA): device time per kernel at several grid targets.

Each setting of MIXKV_ATTEND_BLOCKS_PER_SM (the split policy's target blocks per multiprocessor, a
benchmark-only knob read once per process) runs in its own process over the bench_store cases
(bf16, Hq 32, Hkv 8, D 128, B 1; uniform and uneven segments of 64 / 1,024 / 32,000 tokens).
Prints one table: graph us per call and the split / combine kernels' device us.
--one-case runs only uniform 32,000 a few times (for a profiler such as ncu).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = [8, 4, 16]
CASES = [("uniform", 64), ("uneven", 64), ("uniform", 1024), ("uneven", 1024), ("uniform", 32000), ("uneven", 32000)]


def measure(cases: list[tuple[str, int]]) -> list[dict]:
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_store import HKV, HQ, B, D, build_store, kernel_us, time_us, uneven_lengths

    rows = []
    gen = torch.Generator().manual_seed(0)
    for kind, mean in cases:
        lengths = [mean] * (B * HKV) if kind == "uniform" else uneven_lengths(mean, gen)
        store = build_store(lengths, reserve=16)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        graph = time_us(lambda s=store, q=q: s.attend(q), reps=20)
        kern = kernel_us(lambda s=store, q=q: s.attend(q))
        rows.append({"kind": kind, "mean": mean, "graph_us": graph, "kernels": kern})
        del store
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help="measure in this process, print JSON")
    parser.add_argument("--one-case", action="store_true", help="uniform 32,000 only, a few calls")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    if args.one_case:
        sys.path.insert(0, os.path.dirname(__file__))
        from bench_store import HKV, HQ, B, D, build_store

        store = build_store([32000] * (B * HKV), reserve=16)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            store.attend(q)
        torch.cuda.synchronize()
        return 0
    if args.child:
        print("JSON " + json.dumps(measure(CASES)))
        return 0
    print(f"{'blocks/SM':>9} " + " ".join(f"{k[:4]}{m:>6}" + " " * 14 for k, m in CASES))
    for setting in SETTINGS:
        env = dict(os.environ, MIXKV_ATTEND_BLOCKS_PER_SM=str(setting))
        res = subprocess.run(
            [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("JSON ")), None)
        if line is None:
            print(f"{setting:>9} failed: {res.stderr[-400:]}")
            continue
        cells = []
        for row in json.loads(line[5:]):
            split = sum(v for k, v in row["kernels"].items() if "combine" not in k)
            comb = sum(v for k, v in row["kernels"].items() if "combine" in k)
            cells.append(f"{row['graph_us']:6.1f} ({split:5.1f}+{comb:4.1f})")
        print(f"{setting:>9} " + " ".join(cells))
    print("cells: graph us per call (split kernel + combine kernel device us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
