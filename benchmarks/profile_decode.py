"""Decode-step diagnosis at real dimensions: run-to-run spread and where a step's time goes.

Random-weight model at the shipped real-dimension config (bf16, nothing downloaded). First the
methods run interleaved ``--repeats`` times (decode ms per token, prefill, total of each run), then
one run per profiled method under torch.profiler: host time and device time per decode step, and the
operators that take the most host and device time.

    python3 benchmarks/profile_decode.py --model llava --length 2000 --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from mixkv.bench.e2e import accepts_token_types, free_memory, run_generate
from mixkv.bench.methods import parse_method
from mixkv.bench.models import attention_dims, build_model, load_config, resolve_model
from mixkv.bench.prompts import build_inputs


def clocks() -> str:
    try:
        query = "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu"
        return subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def profile_run(model: Any, inputs: dict[str, torch.Tensor], method: Any, dims: dict[str, int], args: Any) -> dict:
    from torch.profiler import ProfilerActivity, profile

    steps = args.profile_tokens
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        result = run_generate(
            model,
            inputs,
            method,
            budget=args.budget,
            new_tokens=steps,
            device=torch.device("cuda"),
            layers=dims["layers"],
            kv_heads=dims["kv_heads"],
        )
        wall = time.perf_counter() - t0
    table = prof.key_averages()
    host_top = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    dev_top = sorted(table, key=lambda e: e.self_device_time_total, reverse=True)[: args.top]
    device_total = sum(e.self_device_time_total for e in table) / 1e3
    print(f"\n== profile {method.name}: {steps} tokens, wall {wall * 1e3:.0f} ms (profiler on)")
    print(f"   device time {device_total:.0f} ms in total")
    print(f"   decode {result.decode_ms_per_token:.2f} ms/token under the profiler")
    print("   host (self CPU ms, calls):")
    for e in host_top:
        print(f"     {e.self_cpu_time_total / 1e3:9.2f}  {e.count:7d}  {e.key[:90]}")
    print("   device (self device ms, calls):")
    for e in dev_top:
        print(f"     {e.self_device_time_total / 1e3:9.2f}  {e.count:7d}  {e.key[:90]}")
    return {
        "method": method.name,
        "tokens": steps,
        "wall_ms": wall * 1e3,
        "device_ms": device_total,
        "host_top": [[e.key, e.self_cpu_time_total / 1e3, e.count] for e in host_top],
        "device_top": [[e.key, e.self_device_time_total / 1e3, e.count] for e in dev_top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava")
    parser.add_argument("--length", type=int, default=2000)
    parser.add_argument("--methods", nargs="+", default=["full", "snapkv", "snapkv+mixkv"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--profile", nargs="*", default=["full", "snapkv+mixkv"], help="methods to profile")
    parser.add_argument("--profile-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda")
    spec = resolve_model(args.model)
    config = load_config(spec)
    dims = attention_dims(config)
    model = build_model(config, device)
    inputs, info = build_inputs(config, args.length, device=device, seed=0, token_types=accepts_token_types(model))
    methods = [parse_method(m) for m in args.methods]
    print(f"{spec.label} N={args.length} ({info.image_tokens} image tokens), {args.new_tokens} new tokens")
    print(f"clocks before: {clocks()}")

    def once(method: Any, new: int) -> dict[str, Any]:
        return run_generate(
            model,
            inputs,
            method,
            budget=args.budget,
            new_tokens=new,
            device=device,
            layers=dims["layers"],
            kv_heads=dims["kv_heads"],
        ).as_dict()

    for method in methods:  # warm-up (kernels, allocator)
        once(method, 4)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for method in methods:
            row = once(method, args.new_tokens) | {"repeat": rep}
            runs.append(row)
            print(
                f"rep {rep} {method.name:>14}: prefill {row['prefill_s'] * 1e3:8.1f} ms  "
                f"decode {row['decode_ms_per_token']:7.2f} ms/tok  total {row['total_s']:7.3f} s"
            )
    print(f"clocks after: {clocks()}")
    print("\nmedians over repeats:")
    summary: dict[str, dict[str, float]] = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method.name]
        med = {k: statistics.median(r[k] for r in mine) for k in ("prefill_s", "decode_ms_per_token", "total_s")}
        spread = max(r["decode_ms_per_token"] for r in mine) / min(r["decode_ms_per_token"] for r in mine) - 1
        summary[method.name] = med | {"decode_spread": spread}
        print(
            f"  {method.name:>14}: prefill {med['prefill_s'] * 1e3:8.1f} ms decode {med['decode_ms_per_token']:7.2f} "
            f"ms/tok (spread {spread * 100:4.1f}%) total {med['total_s']:7.3f} s"
        )
    profiles = [profile_run(model, inputs, parse_method(m), dims, args) for m in args.profile]
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": runs, "summary": summary, "profiles": profiles}, indent=1))
    free_memory(device)


if __name__ == "__main__":
    main()
