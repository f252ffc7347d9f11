"""Device time of select and AdaKV capacities alone over a few row shapes: the median of CUDA-graph
replays ("graph"; kernels that overlap under programmatic launches counted once) and each kernel's
duration under torch's profiler (which counts the time a kernel launched early waits for its
predecessor).

--variants also runs every shape through the one-block path of devices before sm_90
(MIXKV_SELECT_MAX_CLUSTER=1); --one-case runs two shapes once per op (for ncu).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Callable

import torch

from mixkv.bench.timing import device_us_by_kernel, median_graph_ms
from mixkv.ops import capacities_into, capacities_select_into, select_into

WINDOW = 32

# (batch, kv heads, prefix P, budget)
SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (1, 4, 31968, 64),
    (1, 4, 2016, 64),
    (8, 32, 2000, 64),
    (1, 4, 31968, 1056),
    (8, 32, 2000, 1056),
)

KNOBS = ("MIXKV_SELECT_MAX_CLUSTER",)
# MIXKV_SELECT_MAX_CLUSTER=1: the one-block path of devices before sm_90
VARIANTS: tuple[dict[str, str], ...] = ({}, {"MIXKV_SELECT_MAX_CLUSTER": "1"})


def device_us(fn: Callable[[], None], reps: int = 20) -> dict[str, float]:
    return {key[:60]: us for key, us, _ in device_us_by_kernel(fn, reps=reps)}


def ops_for(b: int, h: int, p: int, budget: int) -> dict[str, Callable[[], None]]:
    imp = torch.rand(b, h, p, device="cuda") ** 3
    caps = torch.full((b, h), budget - WINDOW, dtype=torch.int32, device="cuda")
    caps_ada = torch.empty_like(caps)
    pos = torch.empty(b, h, p, dtype=torch.int32, device="cuda")
    cnt = torch.empty_like(caps)
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
    scores = torch.randn(b, h, p, device="cuda")
    run_ada_plain = functools.partial(run_ada, normalize=False)
    run_fused = functools.partial(
        capacities_select_into,
        "adakv",
        imp,
        scores,
        budget=budget,
        window=WINDOW,
        layer_idx=3,
        num_layers=8,
        capacities=caps_ada,
        positions=pos,
        counts=cnt,
        validate=False,
    )
    run_select = functools.partial(select_into, imp, caps, pos, cnt, validate=False)
    select_ada = functools.partial(select_into, scores, caps_ada, pos, cnt, validate=False)

    def run_two() -> None:  # what capacities_select replaces: capacities, then select by their result
        run_ada()
        select_ada()

    return {
        "select": run_select,
        "adakv": run_ada,
        "adakv_unnormalized": run_ada_plain,
        "adakv+select": run_two,
        "capacities_select": run_fused,
    }


def short_name(key: str) -> str:
    m = re.search(r"(\w+)_kernel", key)
    return m.group(1) if m else key[:22]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--one-case", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_select: no CUDA device")
        return 0
    if args.one_case:  # each op once per shape, no warm-up (for ncu)
        for shape in SHAPES[:2]:
            for fn in ops_for(*shape).values():
                fn()
        torch.cuda.synchronize()
        return 0
    for variant in VARIANTS if args.variants else ({},):
        for key in KNOBS:
            os.environ.pop(key, None)
        os.environ.update(variant)
        label = ",".join(f"{k.split('_')[-1]}={v}" for k, v in variant.items()) or "default"
        for b, h, p, budget in SHAPES:
            for name, fn in ops_for(b, h, p, budget).items():
                times = device_us(fn)
                parts = "  ".join(f"{short_name(k)}={v:.1f}" for k, v in times.items())
                graph = 1000 * median_graph_ms(fn)
                print(
                    f"{label:<22} B={b} H={h} P={p} budget={budget} {name}: graph {graph:.1f} us"
                    f" (kernels {sum(times.values()):.1f}: {parts})"
                )
    for key in KNOBS:
        os.environ.pop(key, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
