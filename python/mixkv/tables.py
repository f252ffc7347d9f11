"""Per-(layer, head) tables: SparseMM visual-head scores and MixKV's offline head redundancy.

Both are published as JSON objects of per-sample lists:
- SparseMM: ``{"<layer>-<query head>": [score, ...]}``, one entry per query head.
- MixKV redundancy: ``{"<layer>-<kv head>-key": [r, ...], "<layer>-<kv head>-value": [r, ...]}``.
Loaders return float32 tensors ``[num_layers, num_kv_heads]`` and refuse tables whose shape does
not match the model they are used with.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

TableSource = str | os.PathLike[str] | Mapping[str, object] | torch.Tensor

_SPARSEMM_KEY = re.compile(r"^(\d+)-(\d+)$")
_REDUNDANCY_KEY = re.compile(r"^(\d+)-(\d+)-(key|value)$")


def _read(source: object, name: str) -> Mapping[str, object] | torch.Tensor:
    if isinstance(source, torch.Tensor | Mapping):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{name}: no such file: {path}")
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{name}: {path} must hold a JSON object, got {type(data).__name__}")
        return data
    raise TypeError(f"{name} must be a path, a dict or a torch.Tensor, got {type(source).__name__}")


def _sample_mean(name: str, key: str, samples: object) -> float:
    values = samples if isinstance(samples, list | tuple) else [samples]
    if len(values) == 0:
        raise ValueError(f"{name}: entry {key!r} has no samples")
    floats: list[float] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name}: entry {key!r} holds a non-finite or non-numeric value {v!r}")
        floats.append(float(v))
    return sum(floats) / len(floats)


def _grid(name: str, entries: dict[tuple[int, int], float], what: str) -> torch.Tensor:
    """Dense [layers, heads] from (layer, head) -> value, requiring every cell of the grid."""
    if not entries:
        raise ValueError(f"{name}: the table is empty")
    layers = 1 + max(layer for layer, _ in entries)
    heads = 1 + max(head for _, head in entries)
    if len(entries) != layers * heads:
        raise ValueError(f"{name}: the table is not a full grid of layers x {what} ({len(entries)} entries)")
    out = torch.empty(layers, heads, dtype=torch.float64)
    for (layer, head), value in entries.items():
        out[layer, head] = value
    return out


def _check_shape(name: str, table: torch.Tensor, expected: tuple[int, int], what: str) -> None:
    if tuple(table.shape) != expected:
        raise ValueError(
            f"{name} has {table.shape[0]} layers x {table.shape[1]} {what}, but the model has "
            f"{expected[0]} layers x {expected[1]} {what}; the table was measured on a different model"
        )


def load_sparsemm_table(source: TableSource, *, num_layers: int, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """SparseMM head scores as float32 ``[num_layers, num_kv_heads]``, summing to 1.

    ``source``: a JSON file or dict ``{"layer-head": [score, ...]}`` with one entry per query head
    (samples are averaged), or a tensor ``[num_layers, num_heads]`` (per query head) or
    ``[num_layers, num_kv_heads]`` (already per kv head). Scores are normalised to sum 1 over all
    layers and heads, then summed over the query heads of each GQA group.
    """
    name = "sparsemm_table"
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    data = _read(source, name)
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[1] not in (num_heads, num_kv_heads):
            raise ValueError(
                f"{name} must have shape [{num_layers}, {num_heads}] (per query head) or "
                f"[{num_layers}, {num_kv_heads}] (per kv head), got {tuple(data.shape)}"
            )
        table = data.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        _check_shape(name, table, (num_layers, table.shape[1]), "heads")
    else:
        entries: dict[tuple[int, int], float] = {}
        for key, samples in data.items():
            match = _SPARSEMM_KEY.match(str(key))
            if match is None:
                raise ValueError(f"{name}: keys must look like 'layer-head', got {key!r}")
            entries[(int(match.group(1)), int(match.group(2)))] = _sample_mean(name, str(key), samples)
        table = _grid(name, entries, "query heads")
        _check_shape(name, table, (num_layers, num_heads), "query heads")
    if bool((table < 0).any()):
        raise ValueError(f"{name} contains negative scores")
    total = float(table.sum())
    if total <= 0.0:
        raise ValueError(f"{name} sums to zero; it cannot give budgets")
    table = table / total
    if table.shape[1] == num_heads and num_heads != num_kv_heads:
        table = table.view(num_layers, num_kv_heads, num_heads // num_kv_heads).sum(dim=-1)
    return table.to(torch.float32).contiguous()


def load_redundancy_table(source: TableSource, *, num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """MixKV offline head redundancy r as float32 ``[num_layers, num_kv_heads]``.

    ``source``: a JSON file or dict ``{"layer-kvhead-key": [r, ...], "layer-kvhead-value": [...]}``
    (the ``key`` entries, averaged over samples, are r; ``value`` entries are ignored), or a tensor
    ``[num_layers, num_kv_heads]``. Values must lie in [0, 1].
    """
    name = "redundancy_table"
    data = _read(source, name)
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"{name} must have shape [{num_layers}, {num_kv_heads}], got {tuple(data.shape)}")
        table = data.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    else:
        entries: dict[tuple[int, int], float] = {}
        for key, samples in data.items():
            match = _REDUNDANCY_KEY.match(str(key))
            if match is None:
                raise ValueError(f"{name}: keys must look like 'layer-kvhead-key' or 'layer-kvhead-value', got {key!r}")
            if match.group(3) == "key":
                entries[(int(match.group(1)), int(match.group(2)))] = _sample_mean(name, str(key), samples)
        table = _grid(name, entries, "kv heads")
    _check_shape(name, table, (num_layers, num_kv_heads), "kv heads")
    if bool(((table < 0) | (table > 1)).any()):
        raise ValueError(f"{name} values must lie in [0, 1]")
    return table.to(torch.float32).contiguous()
