"""Runs every CUDA kernel once on small shapes (padding, GQA, every dtype): the compute-sanitizer driver."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

import mixkv.ops as ops
from mixkv.store import VarlenKVStore

DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


def run(dtype: torch.dtype, n: int, budget: int) -> None:
    dev = torch.device("cuda")
    batch, hq, hkv, window, dim = 2, 8, 2, 16, 64
    valid = torch.tensor([n, n - 83], dtype=torch.int32, device=dev)
    q = torch.randn(batch, hq, window, dim, device=dev, dtype=dtype)
    k = torch.randn(batch, hkv, n, dim, device=dev, dtype=dtype)
    v = torch.randn(batch, hkv, n, dim, device=dev, dtype=dtype)
    opts = {"snapkv": {}, "pyramidkv": {}, "adakv": {}, "sparsemm": {"head_scores": torch.full((4, hkv), 1 / 8)}}
    for method in ops.METHODS:
        for pooling in ops.POOLINGS:
            res = ops.compute_scores(
                q,
                k,
                v,
                method=method,
                pooling=pooling,
                kernel_size=5,
                gqa="mean",
                valid_lengths=valid,
                need_importance=True,
            )
    assert res.importance is not None
    ops.head_redundancy(k, valid_lengths=valid)
    for policy in ops.POLICIES:
        extra = dict(opts[policy])
        if "head_scores" in extra:
            extra["head_scores"] = extra["head_scores"].to(dev)
        caps = ops.capacities(
            policy,
            res.importance,
            budget=budget,
            window=window,
            layer_idx=1,
            num_layers=4,
            valid_lengths=valid,
            **extra,
        )
        positions, counts = ops.select(res.scores, caps)
    store = VarlenKVStore.from_selection(k, v, positions, counts, window, reserve=4, valid_lengths=valid)
    for _ in range(10):  # crosses the reservation: growth
        store.append(torch.randn(batch, hkv, 1, dim, device=dev, dtype=dtype), torch.randn_like(k[:, :, :1]))
        store.attend(torch.randn(batch, hq, 1, dim, device=dev, dtype=dtype))
    store.append(torch.randn(batch, hkv, 3, dim, device=dev, dtype=dtype), torch.randn_like(k[:, :, :3]))
    store.attend(torch.randn(batch, hq, 3, dim, device=dev, dtype=dtype))
    store.reorder(torch.tensor([1, 0, 1], device=dev))
    store.attend(torch.randn(3, hq, 1, dim, device=dev, dtype=dtype))
    torch.cuda.synchronize()


def run_selection_shapes(cap: str, part: str) -> None:
    """select ("select"), AdaKV capacities ("adakv") or both fused ("fused") on long rows (clusters), many
    rows and large budgets; cap "1" is the one-block path of devices before sm_90 (MIXKV_SELECT_MAX_CLUSTER=1)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    imp = torch.rand(2, 4, 12_000, device=dev, generator=gen) ** 3
    valid = torch.tensor([12_032, 5_000], dtype=torch.int32, device=dev)
    many = torch.rand(2, 16, 2000, device=dev, generator=gen)
    try:
        os.environ["MIXKV_SELECT_MAX_CLUSTER"] = cap
        if part == "select":
            for c in (0, 64, 1056, 12_000):
                ops.select(imp, torch.full((2, 4), c, dtype=torch.int32, device=dev))
            ops.select(many, torch.full((2, 16), 96, dtype=torch.int32, device=dev))
        elif part == "fused":
            # capacities_select: the fused AdaKV path (m = 128 ranked per thread, m = 4,096 by radix cut)
            scores = torch.randn(2, 4, 12_000, device=dev, generator=gen)
            for budget in (64, 1056):
                caps = torch.empty(2, 4, dtype=torch.int32, device=dev)
                pos = torch.empty(2, 4, 12_000, dtype=torch.int32, device=dev)
                cnt = torch.empty(2, 4, dtype=torch.int32, device=dev)
                ops.capacities_select_into(
                    "adakv",
                    imp,
                    scores,
                    budget=budget,
                    window=32,
                    layer_idx=1,
                    num_layers=4,
                    capacities=caps,
                    positions=pos,
                    counts=cnt,
                    valid_lengths=valid,
                )
        else:
            for budget in (64, 1056):
                for normalize in (True, False):
                    opts = {"normalize": normalize, "valid_lengths": valid}
                    ops.capacities("adakv", imp, budget=budget, window=32, layer_idx=1, num_layers=4, **opts)
            ops.capacities("adakv", many, budget=96, window=32, layer_idx=1, num_layers=4)
    finally:
        del os.environ["MIXKV_SELECT_MAX_CLUSTER"]
    torch.cuda.synchronize()


def run_long_chunks(wgmma1: str, wgmma: str, tma: str = "1") -> None:
    """Scoring at Qwen2-VL-7B head counts (224 packed rows; and 160) on chunks long enough to wrap the tile rings
    of both passes; pass 1 on warpgroup MMA ("1", the default on sm_90) or mma.sync ("0"), pass 2 on
    warpgroup MMA ("1") or mma.sync ("0"); the warpgroup passes' tiles by tensor map (tma "1", the
    default) or cp.async ("0")."""
    os.environ["MIXKV_SCORE_WGMMA1"] = wgmma1
    os.environ["MIXKV_SCORE_WGMMA"] = wgmma
    os.environ["MIXKV_SCORE_TMA"] = tma
    try:
        dev = torch.device("cuda")
        # (three warpgroups: 5 query heads per kv head, a window of 20 in 32 packed rows each)
        shapes = ((torch.bfloat16, "mean", 40000, 28, 32), (torch.float16, "max", 3000, 28, 32))
        for dtype, gqa, n, hq, w in (*shapes, (torch.bfloat16, "mean", 9000, 20, 20)):
            valid = torch.tensor([n - 517], dtype=torch.int32, device=dev)
            q = torch.randn(1, hq, w, 128, device=dev, dtype=dtype)
            k = torch.randn(1, 4, n, 128, device=dev, dtype=dtype)
            v = torch.randn(1, 4, n, 128, device=dev, dtype=dtype)
            # attn: the warpgroup pass 1 without the unit-key sums
            methods = ("mixkv", "attn") if dtype == torch.bfloat16 and wgmma1 == "1" else ("mixkv",)
            for method in methods:
                ops.compute_scores(q, k, v, method=method, pooling="max", kernel_size=7, gqa=gqa, valid_lengths=valid)
        torch.cuda.synchronize()
    finally:
        del os.environ["MIXKV_SCORE_WGMMA1"]
        del os.environ["MIXKV_SCORE_WGMMA"]
        del os.environ["MIXKV_SCORE_TMA"]


def main() -> int:
    sections: list[tuple[str, Callable[[], None]]] = [
        *[
            (f"{part}, {label}", lambda cap=cap, part=part: run_selection_shapes(cap, part))
            for cap, label in (("8", "clusters"), ("1", "one block per row"))
            for part in ("select", "adakv", "fused")
        ],
        *[(f"pipeline {dtype}", lambda dtype=dtype: run(dtype, n=300, budget=40)) for dtype in DTYPES],
        ("long segments (split attention)", lambda: run(torch.bfloat16, n=5000, budget=4000)),
        ("scoring, long chunks, warpgroup-MMA pass 1, mma.sync pass 2", lambda: run_long_chunks("1", "0")),
        ("scoring, long chunks, mma.sync passes", lambda: run_long_chunks("0", "0")),
        ("scoring, long chunks, warpgroup-MMA passes", lambda: run_long_chunks("1", "1")),
        ("scoring, long chunks, warpgroup-MMA passes by cp.async", lambda: run_long_chunks("1", "1", "0")),
    ]
    failed = []
    for name, section in sections:  # one failing section does not hide the others from the tool
        try:
            section()
            print(f"sanitize driver: {name}: ran")
        except RuntimeError as error:
            failed.append(name)
            print(f"sanitize driver: {name}: FAILED: {str(error).splitlines()[0]}")
    if failed:
        print(f"sanitize driver: {len(failed)} section(s) failed: {', '.join(failed)}")
        return 1
    print("sanitize driver: every kernel ran")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
