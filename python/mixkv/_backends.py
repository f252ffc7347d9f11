"""Optional attention backends over a varlen store: flash-attn's and torch's varlen kernels.

Both view every segment (b, kv-head) as its own sequence with one kv head and the G query heads of
its group as that sequence's heads, so no key or value is copied. They run on CUDA only, for
float16 / bfloat16. Masking of the T new queries is causal, aligned to the end of the segment.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch


def _varlen_attn() -> Callable[..., torch.Tensor] | None:
    try:
        module = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return None
    fn = getattr(module, "varlen_attn", None)
    if not callable(fn):
        return None
    try:  # older releases lack the arguments this backend needs
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    return fn if {"seqused_k", "enable_gqa", "window_size", "scale"} <= set(params) else None


def _flash_varlen() -> Callable[..., torch.Tensor] | None:
    try:
        module = importlib.import_module("flash_attn")
    except ImportError:
        return None
    fn = getattr(module, "flash_attn_varlen_func", None)
    return fn if callable(fn) else None


def available(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run for tensors of ``dtype`` on ``device`` (always includes ``mixkv``)."""
    names = ["auto", "mixkv"]
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _flash_varlen() is not None:
            names.append("flash")
        if _varlen_attn() is not None:
            names.append("torch")
    return names


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B * Hkv * T, G, D]: each segment's T queries, its G heads as heads."""
    b, hq, t, d = q.shape
    g = hq // num_kv_heads
    return q.reshape(b, num_kv_heads, g, t, d).permute(0, 1, 3, 2, 4).reshape(b * num_kv_heads * t, g, d)


def _ungroup(out: torch.Tensor, shape: torch.Size, num_kv_heads: int) -> torch.Tensor:
    b, hq, t, d = shape
    g = hq // num_kv_heads
    return out.reshape(b, num_kv_heads, t, g, d).permute(0, 1, 3, 2, 4).reshape(b, hq, t, d)


def _run_grouped(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    num_segments: int,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_span: int,
    **options: Any,
) -> torch.Tensor:
    """Calls a varlen kernel with one sequence per segment: its G query heads over its one kv head."""
    num_kv_heads = num_segments // q.shape[0]
    out = fn(
        _group_queries(q, num_kv_heads),
        k_buf.unsqueeze(1),
        v_buf.unsqueeze(1),
        cu_q,
        cu_k,
        q.shape[2],
        max(int(max_span), 1),
        **options,
    )
    return _ungroup(out, q.shape, num_kv_heads)


def flash(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    max_span: int,
    scale: float,
) -> torch.Tensor:
    """flash_attn_varlen_func with reservation gaps modelled as sequences without queries."""
    fn = _flash_varlen()
    assert fn is not None
    num_segments = offsets.numel()
    t = q.shape[2]
    off = offsets.reshape(-1)
    ends = off + lengths.reshape(-1)
    # real sequence s covers [off_s, end_s); the gap [end_s, off_{s+1}) is a sequence with no query.
    cu_k = torch.stack([off, ends], dim=1).reshape(-1).to(torch.int32)
    steps = torch.arange(num_segments, device=q.device, dtype=torch.int32) * t
    cu_q = torch.stack([steps, steps + t], dim=1).reshape(-1).contiguous()
    return _run_grouped(
        fn, q, k_buf, v_buf, num_segments, cu_q, cu_k.contiguous(), max_span, softmax_scale=scale, causal=t > 1
    )


def torch_varlen(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    max_span: int,
    scale: float,
) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn with seqused_k = lengths (reservations unread)."""
    fn = _varlen_attn()
    assert fn is not None
    num_segments = offsets.numel()
    t = q.shape[2]
    slots = torch.tensor([k_buf.shape[0]], device=q.device, dtype=torch.int32)
    cu_k = torch.cat([offsets.reshape(-1), slots]).to(torch.int32)
    cu_q = torch.arange(num_segments + 1, device=q.device, dtype=torch.int32) * t
    return _run_grouped(
        fn,
        q,
        k_buf,
        v_buf,
        num_segments,
        cu_q,
        cu_k,
        max_span,
        scale=scale,
        window_size=(-1, 0) if t > 1 else (-1, -1),
        enable_gqa=True,
        seqused_k=lengths.reshape(-1).to(torch.int32),
    )
