"""Benchmark of the varlen KV store: append per decode step and attention per layer (CUDA).

bf16, Hq 32, Hkv 8, D 128, B 1 (one layer):
  (a) append: us per layer per step at 64 .. 32,000 tokens per segment, beside a
      reallocate-and-copy baseline (torch.cat of the whole dense cache, as the reference does);
  (b) attention: us per layer for uniform segments of 64 / 1,024 / 32,000 tokens and for uneven
      (log-normal, AdaKV-like) segments of the same total, beside the bandwidth floor (K+V bytes
      over the measured device copy bandwidth) and torch SDPA over a dense [B, Hkv, L, D] cache.
Prints a table and writes JSON to --out. Without CUDA it prints the plan and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

from mixkv.bench.timing import device_us_by_kernel

HQ, HKV, D, B = 32, 8, 128, 1
APPEND_LENGTHS = [64, 256, 1024, 4096, 32000]
ATTEND_LENGTHS = [64, 1024, 32000]


def plan() -> str:
    return (
        "plan: bf16 Hq=32 Hkv=8 D=128 B=1\n"
        f"  (a) append us/layer/step at {APPEND_LENGTHS} tokens per segment vs torch.cat of the dense cache\n"
        f"  (b) attend us/layer, uniform and log-normal segments of {ATTEND_LENGTHS} tokens on average,\n"
        "      vs the bandwidth floor (measured D2D copy) and torch SDPA over a dense cache\n"
        "  timing: CUDA graphs of 20 calls where possible, CUDA events, median of 30 reps after warm-up;\n"
        "  mixkv_eager: the same calls without a graph (Python + launch included); kernels: torch profiler"
    )


def time_us(fn: Callable[[], object], reps: int = 30, inner: int = 20, graph: bool = True) -> float:
    """Median microseconds per call; `inner` calls per timed replay (captured in a CUDA graph when possible)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run: Callable[[], object]
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
                with torch.cuda.graph(g, stream=s):
                    for _ in range(inner):
                        fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            run = g.replay
        except Exception:
            graph = False
    if not graph:

        def run() -> None:
            for _ in range(inner):
                fn()

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / inner)
    return statistics.median(times)


def kernel_us(fn: Callable[[], object], calls: int = 20) -> dict[str, float]:
    """Device microseconds per call of each kernel `fn` launches (torch profiler), by kernel name."""
    out: dict[str, float] = {}
    for key, us, _ in device_us_by_kernel(fn, reps=calls, warmup=1):
        name = "combine" if "combine" in key else ("split" if "split" in key else key[:40])
        out[name] = out.get(name, 0.0) + us
    return out


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + written) from a 2 GiB device-to-device copy."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda a=dst, b=src: a.copy_(b), reps=10, inner=2, graph=False)
    del src, dst
    return 2 * n / (us * 1e-6)


def uneven_lengths(mean: int, gen: torch.Generator) -> list[int]:
    """Log-normal per-head lengths renormalised to the uniform total (AdaKV-like spread)."""
    raw = torch.exp(torch.randn(B * HKV, generator=gen, dtype=torch.float64) * 1.0)
    total = mean * B * HKV
    lengths = torch.clamp((raw / raw.sum() * total).round().to(torch.int64), min=1)
    lengths[0] += total - int(lengths.sum())
    return [max(1, int(x)) for x in lengths]


def build_store(lengths: list[int], reserve: int):  # -> VarlenKVStore
    from mixkv.store import VarlenKVStore

    n = max(lengths)
    keys = torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    counts = torch.tensor(lengths, dtype=torch.int32, device="cuda").view(B, HKV)
    positions = torch.arange(n, dtype=torch.int32, device="cuda").expand(B, HKV, n).contiguous()
    return VarlenKVStore.from_selection(keys, values, positions, counts, 0, reserve=reserve)


def bench_append(results: dict) -> None:
    from mixkv import _core

    rows = []
    for length in APPEND_LENGTHS:
        store = build_store([length] * (B * HKV), reserve=8192)  # never grows while timing
        k = torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        us = time_us(lambda s=store, k=k, v=v: s.append(k, v), graph=False, inner=50)

        def kernel_only(s=store, k=k, v=v) -> None:
            stream = torch.cuda.current_stream().cuda_stream
            _core.store_append(k, v, s.offsets.reshape(-1), s.lengths.reshape(-1), s.k_buffer, s.v_buffer, stream)

        kernel_us = time_us(kernel_only)
        dense_k = torch.randn(B, HKV, length, D, device="cuda", dtype=torch.bfloat16)
        dense_v = torch.randn_like(dense_k)
        base = time_us(lambda a=dense_k, b=dense_v, k=k, v=v: (torch.cat([a, k], 2), torch.cat([b, v], 2)))
        rows.append(
            {"tokens_per_segment": length, "append_us": us, "append_kernel_us": kernel_us, "cat_baseline_us": base}
        )
        print(
            f"append  L={length:>6}  VarlenKVStore.append {us:8.2f} us   kernel (graph) {kernel_us:8.2f} us"
            f"   torch.cat {base:8.2f} us"
        )
        del store, dense_k, dense_v
    results["append"] = rows


def bench_attend(results: dict, bandwidth: float) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for mean in ATTEND_LENGTHS:
        for kind in ("uniform", "uneven"):
            lengths = [mean] * (B * HKV) if kind == "uniform" else uneven_lengths(mean, gen)
            store = build_store(lengths, reserve=16)
            q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            us = {"mixkv": time_us(lambda s=store, q=q: s.attend(q))}
            us["mixkv_eager"] = time_us(lambda s=store, q=q: s.attend(q), graph=False, inner=50)
            kernels = kernel_us(lambda s=store, q=q: s.attend(q))
            from mixkv import _backends

            for name in ("flash", "torch"):
                if name in _backends.available(store.device, store.dtype):
                    try:
                        us[name] = time_us(lambda s=store, q=q, n=name: s.attend(q, backend=n))
                    except Exception as exc:  # a backend may reject a shape
                        print(f"  {name} backend failed: {exc}", file=sys.stderr)
            kv_bytes = 2 * sum(lengths) * D * 2
            floor = kv_bytes / bandwidth * 1e6
            dense_len = max(lengths)
            dk = torch.randn(B, HKV, dense_len, D, device="cuda", dtype=torch.bfloat16)
            dv = torch.randn_like(dk)
            sdpa = time_us(
                lambda q=q, dk=dk, dv=dv: torch.nn.functional.scaled_dot_product_attention(q, dk, dv, enable_gqa=True)
            )
            row = {"kind": kind, "mean_tokens": mean, "lengths": lengths, "floor_us": floor, "sdpa_dense_us": sdpa}
            row["kernels_us"] = kernels
            row.update({f"{k}_us": v for k, v in us.items()})
            rows.append(row)
            extra = "  ".join(f"{k} {v:8.2f}" for k, v in us.items())
            print(f"attend  {kind:>7} L={mean:>6}  {extra}   floor {floor:8.2f}   sdpa(dense) {sdpa:8.2f}  (us)")
            print("        kernels (device us/call): " + "  ".join(f"{k} {v:.2f}" for k, v in kernels.items()))
            del store, dk, dv
    results["attend"] = rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_store.json", help="path of the JSON results")
    args = parser.parse_args(argv)
    print(plan())
    import mixkv

    if not (torch.cuda.is_available() and mixkv.cuda_available()):
        print("no CUDA device (or no CUDA kernels in this build): nothing measured")
        return 0
    torch.manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "config": {"Hq": HQ, "Hkv": HKV, "D": D, "B": B}}
    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    bench_append(results)
    bench_attend(results, bw)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
