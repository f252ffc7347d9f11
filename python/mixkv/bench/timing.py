"""Small timing helpers: device synchronisation, medians of eager calls and of CUDA-graph replays (and
the graph capture itself), device time per kernel."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_eager_ms(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds, synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable[[], object], inner: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``inner`` calls of ``fn`` (after two warm-up calls on a side stream), replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def median_graph_ms(fn: Callable[[], object], reps: int = 20, inner: int = 5) -> float:
    """Median device time of ``fn`` in milliseconds replayed from a CUDA graph (CUDA only)."""
    graph = capture_graph(fn, inner)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_graph_ms(lambda: dst.copy_(src), reps=reps, inner=1) / 1e3)


def device_us_by_kernel(fn: Callable[[], object], reps: int = 10, warmup: int = 3) -> list[tuple[str, float, int]]:
    """Device time of each kernel ``fn`` launches, under torch.profiler (CUDA only): (name, us per
    call of ``fn``, launches per call), most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return [(ev.key, ev.device_time_total / reps, ev.count // reps) for ev in events if ev.device_time_total > 0]
