"""One timed ``generate`` run: prefill (time to first token), total, decode rate, peak memory, cache bytes."""

from __future__ import annotations

import gc
import inspect
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from mixkv._compat import cache_kwargs
from mixkv.bench.methods import Method
from mixkv.bench.timing import sync


@dataclass
class RunResult:
    """The measurements of one generate run (memory fields are None off CUDA)."""

    method: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    total_s: float
    decode_ms_per_token: float | None
    decode_tokens_per_s: float | None
    peak_bytes: int | None
    cache_bytes: int | None
    full_cache_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenClock(BaseStreamer):
    """Records a synchronised timestamp at each ``put``: the prompt, then every generated step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        sync(self.device)


def free_memory(device: torch.device) -> None:
    """Drops unreachable tensors and returns cached blocks to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def accepts_token_types(model: nn.Module) -> bool:
    """Whether the model's forward takes ``mm_token_type_ids`` (Qwen2-VL in recent transformers)."""
    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def make_cache(model: nn.Module, method: Method, budget: int, layers: int, kv_heads: int) -> Any:
    """A MixKVCache for ``method`` (None for the full cache); SparseMM gets a uniform head table."""
    if method.policy is None:
        return None
    from mixkv import MixKVCache  # type: ignore[attr-defined]

    extra: dict[str, Any] = {}
    if method.policy == "sparsemm":
        extra["sparsemm_table"] = torch.full((layers, kv_heads), 1.0 / (layers * kv_heads))
    return MixKVCache(model, policy=method.policy, mix=method.mix, budget=budget, **extra)


def cache_bytes(cache: Any) -> int | None:
    """Bytes held by a transformers cache's key/value tensors (None if its layout is unknown)."""
    if cache is None:
        return None
    nbytes = getattr(cache, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _returned_cache(out: Any) -> Any:
    """The cache a ``return_dict_in_generate`` output holds (``cache`` in newer transformers)."""
    held = getattr(out, "cache", None)
    return held if held is not None else getattr(out, "past_key_values", None)


def run_generate(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    method: Method,
    *,
    budget: int,
    new_tokens: int,
    device: torch.device | str,
    layers: int,
    kv_heads: int,
) -> RunResult:
    """Generates ``new_tokens`` greedily (no early stop) and measures the run."""
    device = torch.device(device)
    free_memory(device)
    cache = make_cache(model, method, budget, layers, kv_heads)
    clock = TokenClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    extra = cache_kwargs(model, cache)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            **extra,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
            return_dict_in_generate=True,
        )
    sync(device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    batch, prompt = inputs["input_ids"].shape
    generated = int(out.sequences.shape[1] - prompt)
    stamps = clock.times[1:]  # the first put is the prompt itself
    prefill = (stamps[0] - start) if stamps else total
    decode_ms = decode_tps = None
    if len(stamps) >= 2:
        decode_s = stamps[-1] - stamps[0]
        decode_ms = decode_s / (len(stamps) - 1) * 1e3
        decode_tps = batch * (len(stamps) - 1) / decode_s if decode_s > 0 else None
    held = cache if cache is not None else _returned_cache(out)
    used = cache_bytes(held)
    full = getattr(cache, "full_nbytes", None) if cache is not None else used
    del out, held, cache
    free_memory(device)
    return RunResult(
        method=method.name,
        batch=int(batch),
        prompt_tokens=int(prompt),
        new_tokens=generated,
        prefill_s=prefill,
        total_s=total,
        decode_ms_per_token=decode_ms,
        decode_tokens_per_s=decode_tps,
        peak_bytes=peak,
        cache_bytes=used,
        full_cache_bytes=int(full) if isinstance(full, int) else None,
    )


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory error."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
