"""Building the cache a tool runs with: a MixKVCache for a policy, or the full DynamicCache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixkv.tools._models import ToolError

POLICIES: tuple[str, ...] = ("snapkv", "pyramidkv", "adakv", "sparsemm")
MIX_VARIANTS: tuple[str, ...] = ("attn", "keydiff", "vnorm", "knorm", "uniform-mix", "mixkv")


@dataclass(frozen=True)
class CacheSpec:
    """What to compress with: ``policy`` None means the full (uncompressed) cache."""

    policy: str | None
    mix: bool | str = False
    budget: int = 64
    window: int = 32
    sparsemm_table: str | Path | torch.Tensor | None = None
    redundancy_table: str | Path | torch.Tensor | None = None

    @property
    def label(self) -> str:
        if self.policy is None:
            return "full"
        mix = self.mix if isinstance(self.mix, str) else ("mixkv" if self.mix else "")
        return f"{self.policy}+{mix}" if mix and mix != "attn" else self.policy


def check_spec(spec: CacheSpec) -> None:
    """Argument checks the commands run before loading anything."""
    if spec.policy is None:
        return
    if spec.policy not in POLICIES:
        raise ToolError(f"--policy must be one of {', '.join(POLICIES)}, got {spec.policy!r}")
    if isinstance(spec.mix, str) and spec.mix not in MIX_VARIANTS:
        raise ToolError(f"--mix must be one of {', '.join(MIX_VARIANTS)}, got {spec.mix!r}")
    if spec.budget <= 0:
        raise ToolError(f"--budget must be a positive number of tokens, got {spec.budget}")
    if spec.window <= 0:
        raise ToolError(f"--window must be a positive number of tokens, got {spec.window}")
    for name, table in (("--sparsemm-table", spec.sparsemm_table), ("--redundancy-table", spec.redundancy_table)):
        if isinstance(table, (str, Path)) and not Path(table).is_file():
            raise ToolError(f"{name} file not found: {str(table)!r}")


def mixkv_cache_class() -> Any | None:
    """``mixkv.MixKVCache`` when this build provides it, else None."""
    try:
        import mixkv

        return getattr(mixkv, "MixKVCache", None)
    except ImportError:
        return None


def make_cache(model: Any, spec: CacheSpec) -> Any:
    """A fresh cache for one generate call."""
    from transformers import DynamicCache

    if spec.policy is None:
        return DynamicCache(config=model.config)
    cls = mixkv_cache_class()
    if cls is None:
        raise ToolError("this mixkv build has no MixKVCache; only the full cache (--policy full) can run")
    kwargs: dict[str, Any] = {
        "policy": spec.policy,
        "mix": spec.mix,
        "budget": spec.budget,
        "window": spec.window,
    }
    if spec.sparsemm_table is not None:
        kwargs["sparsemm_table"] = spec.sparsemm_table
    if spec.redundancy_table is not None:
        kwargs["redundancy_table"] = spec.redundancy_table
    try:
        return cls(model, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ToolError(f"cannot build the {spec.label} cache: {str(exc).splitlines()[0]}") from exc


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(bytes held, bytes the full cache would hold) for a cache after generate."""
    held = getattr(cache, "nbytes", None)
    full = getattr(cache, "full_nbytes", None)
    if isinstance(held, int) and isinstance(full, int):
        return held, full
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total, total
