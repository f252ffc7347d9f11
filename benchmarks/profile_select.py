"""Device time of select and AdaKV capacities alone (torch profiler) over a few row shapes."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from mixkv.ops import capacities_into, select_into

WINDOW = 32

# (batch, kv heads, prefix P, budget)
SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (1, 4, 31968, 64),
    (1, 4, 2016, 64),
    (8, 32, 2000, 64),
    (1, 4, 31968, 1056),
)


def device_us(fn: Callable[[], None], reps: int = 20) -> dict[str, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {ev.key[:60]: ev.device_time_total / reps for ev in prof.key_averages() if ev.device_time_total > 0}


def main() -> int:
    argparse.ArgumentParser(description=__doc__).parse_args()
    if not torch.cuda.is_available():
        print("profile_select: no CUDA device")
        return 0
    for b, h, p, budget in SHAPES:
        imp = torch.rand(b, h, p, device="cuda") ** 3
        caps = torch.empty(b, h, dtype=torch.int32, device="cuda")
        caps_ada = torch.empty_like(caps)
        pos = torch.empty(b, h, p, dtype=torch.int32, device="cuda")
        cnt = torch.empty_like(caps)
        caps.fill_(budget - WINDOW)

        run_select = functools.partial(select_into, imp, caps, pos, cnt, validate=False)
        run_ada = functools.partial(
            capacities_into,
            "adakv",
            imp,
            budget=budget,
            window=WINDOW,
            layer_idx=3,
            num_layers=8,
            out=caps_ada,
            validate=False,
        )

        for name, fn in (("select", run_select), ("adakv", run_ada)):
            times = device_us(fn)
            parts = "  ".join(f"{k.split('(')[0].split('<')[0][-28:]}={v:.1f}" for k, v in times.items())
            print(f"B={b} H={h} P={p} budget={budget} {name}: total {sum(times.values()):.1f} us  {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
