"""A straightforward per-head-loop PyTorch implementation of one layer's compression step.

This is the shape published research code takes (one head at a time, full attention matrices in
float32, torch.topk per head); the benchmarks run it on the same tensors as mixkv for comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def _align(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return x * a.mean() / (x.mean() + 1e-8)


def loop_compress(
    q_window: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    policy: str,
    mix: bool,
    budget: int,
    kernel_size: int = 5,
    floor: float = 0.2,
) -> list[list[torch.Tensor]]:
    """Selected prefix positions per (sequence, kv head) for SnapKV or AdaKV, with or without MixKV."""
    batch, hq, window, dim = q_window.shape
    hkv, n = keys.shape[1], keys.shape[2]
    group = hq // hkv
    prefix = n - window
    base = budget - window
    causal = torch.full((window, window), float("-inf"), device=keys.device).triu(1)
    out: list[list[torch.Tensor]] = []
    for b in range(batch):
        importance = []
        for h in range(hkv):
            q = q_window[b, h * group : (h + 1) * group].float()
            k = keys[b, h].float()
            logits = q @ k.T / math.sqrt(dim)
            logits[:, :, prefix:] += causal
            a = logits.softmax(dim=-1).mean(dim=1)[:, :prefix].mean(dim=0)
            a = F.avg_pool1d(a[None, None], kernel_size, 1, kernel_size // 2)[0, 0]
            importance.append(a)
        if policy == "adakv":
            stacked = torch.stack(importance)
            ranked = stacked.sort(dim=-1, descending=True).values
            factor = ranked[:, :base].sum(-1, keepdim=True) / ranked.sum(-1, keepdim=True)
            won = (stacked * factor).flatten().topk(hkv * base).indices // prefix
            counts = torch.bincount(won, minlength=hkv).float()
            caps = torch.round(counts * (1 - floor) + math.floor(floor * base)).long().tolist()
        else:
            caps = [base] * hkv
        kept = []
        for h in range(hkv):
            a = importance[h]
            score = a
            if mix:
                k = keys[b, h].float()
                vn = _align(_minmax(values[b, h, :prefix].float().norm(dim=-1)), a)
                unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                mean_key = unit.mean(dim=0)
                dv = _align(_minmax(-(unit[:prefix] @ mean_key)), a)
                r = ((n * mean_key.square().sum() - 1) / (n - 1)).clamp(0, 1)
                score = r * dv + (1 - r) * (a + vn)
            kept.append(score.topk(min(caps[h], prefix)).indices.sort().values)
        out.append(kept)
    return out
