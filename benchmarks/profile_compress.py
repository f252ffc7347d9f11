"""Device time of the compression step (Qwen2-VL-7B dims, bf16) by kernel: summed per kernel under
torch.profiler (default), or with ``--timeline`` each kernel's median start and end (us) relative to
the step's first kernel over CUDA-graph replays, and how far it moved the step's end (its end minus the
latest end before it): where the critical path sits when programmatic launches overlap the kernels.
``--out`` writes the timeline as JSON."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable

import torch

from mixkv.bench.compress import make_step
from mixkv.bench.timing import capture_graph, device_us_by_kernel


def short(name: str) -> str:
    m = re.search(r"(\w+_kernel)", name)
    return m.group(1).replace("_kernel", "") if m else name[:28]


def kernel_events(trace_path: str) -> list[tuple[float, float, str]]:
    with open(trace_path) as f:
        trace = json.load(f)
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") == "kernel" and "dur" in ev:
            out.append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]), short(ev["name"])))
    return sorted(out)


def timeline(step: Callable[[], None], reps: int) -> list[dict[str, float | str]]:
    from torch.profiler import ProfilerActivity, profile

    graph = capture_graph(step, inner=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = kernel_events(path)
    if not events or len(events) % reps:
        return []
    per = len(events) // reps
    rows: list[list[tuple[float, float, str]]] = [[] for _ in range(per)]
    for r in range(reps):
        group = events[r * per : (r + 1) * per]
        t0 = group[0][0]
        for i, (s, e, name) in enumerate(group):
            rows[i].append((s - t0, e - t0, name))
    result: list[dict[str, float | str]] = []
    prev_end = 0.0
    for row in rows:
        start = statistics.median(x[0] for x in row)
        end = statistics.median(x[1] for x in row)
        result.append({"kernel": row[0][2], "start_us": start, "end_us": end, "adds_us": max(0.0, end - prev_end)})
        prev_end = max(prev_end, end)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 32000])
    parser.add_argument("--timeline", action="store_true", help="kernel start/end over CUDA-graph replays")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON of the timeline")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_compress: no CUDA device")
        return 0
    torch.manual_seed(0)
    report = []
    for n in args.lengths:
        q = torch.randn(1, 28, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
        for policy, mix in (("snapkv", True), ("adakv", True)):
            step = make_step(q, k, v, policy=policy, mix=mix, budget=64, layers=28)
            if not args.timeline:
                print(f"== N={n} {policy}+mix (device us per step, by kernel)")
                for key, us, count in device_us_by_kernel(step):
                    print(f"  {us:9.1f}  x{count:<3} {key[:90]}")
                continue
            rows = timeline(step, args.reps)
            print(f"== N={n} {policy}+mix: kernel, start, end, adds (median us over {args.reps} graph replays)")
            for r in rows:
                print(f"  {r['kernel']:<28} {r['start_us']:8.1f} {r['end_us']:8.1f} {r['adds_us']:8.1f}")
            report.append({"length": n, "policy": policy, "mix": mix, "kernels": rows})
    if args.out and report:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
