"""One layer's prefill compression step (scores + capacities + select) beside the per-head loop.

Same random bf16 tensors for both, at a model's attention dims (B = 1, window W = 32): median
milliseconds per layer for mixkv (eager wall time, and device time from CUDA-graph replays when the
step can be captured) and for the per-head-loop PyTorch implementation, and their ratio.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from mixkv.bench.loop_reference import loop_compress
from mixkv.bench.timing import median_eager_ms, median_graph_ms

WINDOW = 32
COMPRESS_POLICIES: tuple[tuple[str, bool], ...] = (
    ("snapkv", False),
    ("snapkv", True),
    ("adakv", False),
    ("adakv", True),
)


def make_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    policy: str,
    mix: bool,
    budget: int,
    layers: int,
) -> Callable[[], None]:
    """The mixkv compression step of one layer on fixed tensors (outputs preallocated)."""
    from mixkv.ops import capacities_select_into, capacity_bound, compute_scores

    batch, kv_heads, n = k.shape[0], k.shape[1], k.shape[2]
    prefix = n - WINDOW
    caps = torch.empty(batch, kv_heads, dtype=torch.int32, device=k.device)
    layer = {"budget": budget, "window": WINDOW, "layer_idx": layers // 2, "num_layers": layers}
    # as the cache sizes them: the policy's capacity bound
    max_cap = capacity_bound(policy, num_kv_heads=kv_heads, prefix=prefix, **layer)
    positions = torch.empty(batch, kv_heads, max(max_cap, 1), dtype=torch.int32, device=k.device)
    counts = torch.empty(batch, kv_heads, dtype=torch.int32, device=k.device)

    def step() -> None:
        res = compute_scores(
            q,
            k,
            v,
            method="mixkv" if mix else "attn",
            pooling="avg",
            kernel_size=5,
            gqa="mean",
            need_importance=policy == "adakv",
            validate=False,
        )
        importance = res.importance if res.importance is not None else res.scores
        capacities_select_into(
            policy,
            importance,
            res.scores,
            capacities=caps,
            positions=positions,
            counts=counts,
            validate=False,
            **layer,
        )

    return step


def bench_compress(
    model: str,
    dims: dict[str, int],
    *,
    length: int,
    budget: int,
    device: torch.device,
    reps: int = 20,
    loop_reps: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows for SnapKV/AdaKV without and with MixKV at one length (errors are recorded, not raised)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape_q = (1, dims["q_heads"], WINDOW, dims["head_dim"])
    shape_kv = (1, dims["kv_heads"], length, dims["head_dim"])
    q = torch.randn(shape_q, generator=generator, device=device).to(torch.bfloat16)
    k = torch.randn(shape_kv, generator=generator, device=device).to(torch.bfloat16)
    v = torch.randn(shape_kv, generator=generator, device=device).to(torch.bfloat16)
    rows = []
    for policy, mix in COMPRESS_POLICIES:
        row: dict[str, Any] = {
            "model": model,
            "length": length,
            "budget": budget,
            "policy": policy,
            "mix": mix,
            "q_heads": dims["q_heads"],
            "kv_heads": dims["kv_heads"],
            "head_dim": dims["head_dim"],
            "window": WINDOW,
        }
        loop = functools.partial(loop_compress, q, k, v, policy=policy, mix=mix, budget=budget)
        row["loop_ms"] = median_eager_ms(loop, device, reps=loop_reps, warmup=1)
        try:
            step = make_step(q, k, v, policy=policy, mix=mix, budget=budget, layers=dims["layers"])
            row["mixkv_ms"] = median_eager_ms(step, device, reps=reps)
        except Exception as error:  # the ops may be missing or unimplemented in this build
            row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            continue
        row["mixkv_graph_ms"] = None
        if device.type == "cuda":
            try:
                row["mixkv_graph_ms"] = median_graph_ms(step, reps=reps)
            except Exception as error:  # not capturable: keep the eager number
                row["graph_error"] = f"{type(error).__name__}: {error}"
        row["speedup_vs_loop"] = row["loop_ms"] / row["mixkv_ms"] if row["mixkv_ms"] > 0 else None
        rows.append(row)
    return rows
