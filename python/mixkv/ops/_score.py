"""Token scores (SPEC §1-5): window-attention importance, norms, key diversity and their mixing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixkv import _core
from mixkv._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_int,
    check_last_dim_contiguous,
    check_same_device,
    check_tensor,
    check_valid_lengths,
)
from mixkv._runtime import call, stream_handle, workspace

METHODS: tuple[str, ...] = ("attn", "keydiff", "vnorm", "knorm", "uniform-mix", "mixkv")
POOLINGS: tuple[str, ...] = ("avg", "max")
GQA_REDUCTIONS: tuple[str, ...] = ("mean", "max")


@dataclass(frozen=True)
class ScoreResult:
    """Everything one scoring pass produces for a layer.

    scores: float32 [B, Hkv, N - W], the mixed score S of each prefix position (-inf on padding).
    importance: float32 [B, Hkv, N - W], the pooled attention importance A (when asked for).
    redundancy: float32 [B, Hkv], the head redundancy r that was used: with method "mixkv" the offline
        value when given, else the online estimate; NaN for the methods that use none.
    """

    scores: torch.Tensor
    importance: torch.Tensor | None
    redundancy: torch.Tensor


def _check_qkv(
    query_window: object, keys: object, values: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.device]:
    q = check_tensor("query_window", query_window, ndim=4, dtypes=FLOAT_DTYPES)
    k = check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    v = check_tensor("values", values, ndim=4, dtypes=FLOAT_DTYPES)
    device = check_same_device(keys=k, query_window=q, values=v)
    if q.dtype != k.dtype or v.dtype != k.dtype:
        raise TypeError(f"query_window, keys and values must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"values must have the shape of keys {tuple(k.shape)}, got {tuple(v.shape)}")
    b, hkv, n, d = k.shape
    if b < 1 or hkv < 1 or d < 1:
        raise ValueError(f"keys must have non-empty batch, head and head-dimension sizes, got {tuple(k.shape)}")
    if q.shape[0] != b:
        raise ValueError(f"query_window must have batch {b} like keys, got {q.shape[0]}")
    if q.shape[3] != d:
        raise ValueError(f"query_window must have head dimension {d} like keys, got {q.shape[3]}")
    if q.shape[1] < 1 or q.shape[1] % hkv != 0:
        raise ValueError(f"query_window heads ({q.shape[1]}) must be a positive multiple of the key heads ({hkv})")
    w = q.shape[2]
    if not 1 <= w < n:
        raise ValueError(f"query_window must hold 1 <= W < N window queries, got W = {w} with N = {n}")
    return (
        check_last_dim_contiguous("query_window", q),
        check_last_dim_contiguous("keys", k),
        check_last_dim_contiguous("values", v),
        device,
    )


def _check_redundancy(redundancy: object, batch: int, heads: int, device: torch.device) -> torch.Tensor | None:
    if redundancy is None:
        return None
    r = check_tensor("redundancy", redundancy, ndim=2, dtypes=FLOAT_DTYPES)
    if r.shape[1] != heads or r.shape[0] not in (1, batch):
        raise ValueError(f"redundancy must have shape [1, {heads}] or [{batch}, {heads}], got {tuple(r.shape)}")
    if r.device != device:
        raise ValueError(f"redundancy is on {r.device} but the inputs are on {device}")
    return r.to(torch.float32).contiguous()


def _check_scale(scale: object) -> float:
    if scale is None:
        return 0.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    value = float(scale)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return value


def compute_scores(
    query_window: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    method: str,
    pooling: str,
    kernel_size: int,
    gqa: str,
    redundancy: torch.Tensor | None = None,
    valid_lengths: torch.Tensor | None = None,
    scale: float | None = None,
    need_importance: bool = False,
    validate: bool = True,
) -> ScoreResult:
    """One scoring pass over a layer's keys and values (SPEC §1-5).

    query_window: [B, Hq, W, D], the last W prompt queries after RoPE; keys, values: [B, Hkv, N, D],
    one float dtype, contiguous last dimension. valid_lengths: int [B] non-padding tokens of each
    left-padded sequence. redundancy: [1 or B, Hkv] offline head redundancy (else estimated online).
    ``validate=False`` skips the checks that read values (the NaN/inf scan of the inputs and the
    range of valid_lengths), each a device synchronisation on CUDA.
    """
    q, k, v, device = _check_qkv(query_window, keys, values)
    check_choice("method", method, METHODS)
    check_choice("pooling", pooling, POOLINGS)
    check_choice("gqa", gqa, GQA_REDUCTIONS)
    check_int("kernel_size", kernel_size, minimum=1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    b, hkv, n, d = k.shape
    w = q.shape[2]
    r_in = _check_redundancy(redundancy, b, hkv, device)
    valid = check_valid_lengths(valid_lengths, b, n, device, read_values=validate)
    scale_value = _check_scale(scale)
    if validate:
        check_finite("query_window", q)
        check_finite("keys", k)
        check_finite("values", v)
        if r_in is not None:
            check_finite("redundancy", r_in)

    out = torch.empty((b, hkv, n - w), dtype=torch.float32, device=device)
    importance = torch.empty_like(out) if need_importance else None
    r_out = torch.empty((b, hkv), dtype=torch.float32, device=device)
    ws = workspace(_core.score_workspace_bytes(b, q.shape[1], hkv, n, w, d), device)
    call(
        _core.score,
        q,
        k,
        v,
        valid,
        r_in,
        METHODS.index(method),
        POOLINGS.index(pooling),
        kernel_size,
        GQA_REDUCTIONS.index(gqa),
        scale_value,
        out,
        importance,
        r_out,
        ws,
        stream_handle(device),
    )
    return ScoreResult(scores=out, importance=importance, redundancy=r_out)


def scores(
    query_window: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    method: str = "mixkv",
    pooling: str = "max",
    kernel_size: int = 7,
    gqa: str = "mean",
    redundancy: torch.Tensor | None = None,
    valid_lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The score S of every prefix position: float32 [B, Hkv, N - W], -inf on padding positions.

    ``method`` picks the variant (SPEC §5): attn, keydiff, vnorm, knorm, uniform-mix or mixkv.
    ``pooling``/``kernel_size`` smooth the attention importance along the sequence; ``gqa`` reduces
    the query heads that share a key head; ``scale`` defaults to 1/sqrt(D).
    """
    return compute_scores(
        query_window,
        keys,
        values,
        method=method,
        pooling=pooling,
        kernel_size=kernel_size,
        gqa=gqa,
        redundancy=redundancy,
        valid_lengths=valid_lengths,
        scale=scale,
    ).scores


def head_redundancy(keys: torch.Tensor, valid_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Online head redundancy r (SPEC §4): float32 [B, Hkv], the mean pairwise cosine similarity."""
    k = check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
    check_last_dim_contiguous("keys", k)
    b, hkv, n, d = k.shape
    if n < 1 or d < 1:
        raise ValueError(f"keys must hold at least one token of non-empty head dimension, got {tuple(k.shape)}")
    valid = check_valid_lengths(valid_lengths, b, n, k.device)
    check_finite("keys", k)
    out = torch.empty((b, hkv), dtype=torch.float32, device=k.device)
    ws = workspace(_core.head_redundancy_workspace_bytes(b, hkv, n, d), k.device)
    call(_core.head_redundancy, k, valid, out, ws, stream_handle(k.device))
    return out
