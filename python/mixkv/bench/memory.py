"""Peak-memory breakdown of a compressed run: weights + one layer's prefill working set + cache.

The working set is measured: during a prefill (one new token) with forward hooks on the middle
decoder layer, the layer's input tensors (hidden states, position embeddings, mask: live for the
whole layer) plus the peak allocated inside that layer above what was allocated when it started.
An analytic estimate of the same (bf16 activations of one layer at the prompt length) is reported
beside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixkv._compat import cache_kwargs
from mixkv.bench.e2e import free_memory, make_cache
from mixkv.bench.methods import Method
from mixkv.bench.models import decoder_layers


def analytic_layer_bytes(dims: dict[str, int], tokens: int, element: int = 2) -> int:
    """A rough count of one decoder layer's prefill activations over ``tokens`` tokens.

    Residual and normed hidden states, Q/K/V and the attention output, and the MLP's gate, up and
    product (the largest term).
    """
    hidden = 3 * dims["hidden"]
    attention = (2 * dims["q_heads"] + 2 * dims["kv_heads"]) * dims["head_dim"]
    mlp = 3 * dims["intermediate"]
    return tokens * (hidden + attention + mlp) * element


def measure_layer_working_set(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    method: Method,
    *,
    budget: int,
    dims: dict[str, int],
    device: torch.device,
) -> dict[str, int]:
    """Prefill once with hooks on the middle layer; returns its working set and the run's peak (CUDA)."""
    layers = decoder_layers(model, dims["layers"])
    layer = layers[len(layers) // 2]
    seen: dict[str, int] = {}

    def before(_module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if "start" in seen:
            return
        seen["inputs"] = _tensor_bytes([*args, *kwargs.values()])
        torch.cuda.synchronize(device)
        seen["outer_peak"] = torch.cuda.max_memory_allocated(device)
        seen["start"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    def after(_module: nn.Module, _args: Any, _out: Any) -> None:
        if "inner_peak" in seen:
            return
        torch.cuda.synchronize(device)
        seen["inner_peak"] = torch.cuda.max_memory_allocated(device)

    free_memory(device)
    cache = make_cache(model, method, budget, dims["layers"], dims["kv_heads"])
    handles = [layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after)]
    try:
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            extra = cache_kwargs(model, cache)
            model.generate(**inputs, **extra, max_new_tokens=1, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    del cache
    free_memory(device)
    if "inner_peak" not in seen:
        raise RuntimeError("memory: the middle decoder layer never ran")
    return {
        "allocated_at_layer_start": seen["start"],
        "layer_inputs_bytes": seen["inputs"],
        "layer_working_set_bytes": seen["inputs"] + seen["inner_peak"] - seen["start"],
    }


def _tensor_bytes(values: list[Any]) -> int:
    """Bytes of the distinct CUDA tensor storages among ``values`` (tuples and lists searched)."""
    seen: dict[int, int] = {}
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, tuple | list):
            stack.extend(value)
        elif isinstance(value, torch.Tensor) and value.is_cuda:
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def breakdown_row(
    run: dict[str, Any],
    *,
    weights: int,
    layer_working_set: int,
    allocated_at_layer_start: int,
    analytic_layer: int,
    layer_inputs: int = 0,
) -> dict[str, Any]:
    """One run's breakdown: the modelled peak (weights + layer working set + cache) vs the measured peak."""
    cache = int(run.get("cache_bytes") or 0)
    modelled = weights + layer_working_set + cache
    peak = run.get("peak_bytes")
    return {
        "model": run["model"],
        "length": run["length"],
        "method": run["method"],
        "weights_bytes": weights,
        "layer_working_set_bytes": layer_working_set,
        "layer_working_set_analytic_bytes": analytic_layer,
        "layer_inputs_bytes": layer_inputs,
        "allocated_at_layer_start_bytes": allocated_at_layer_start,
        # held when the layer starts besides weights and the layer's own inputs (the caller's
        # references, e.g. the input embeddings, and earlier layers' compressed cache)
        "held_outside_layer_bytes": max(0, allocated_at_layer_start - weights - layer_inputs),
        "cache_bytes": cache,
        "modelled_peak_bytes": modelled,
        "measured_peak_bytes": peak,
        "unexplained_bytes": (peak - modelled) if isinstance(peak, int) else None,
    }
