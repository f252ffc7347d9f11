"""mixkv: KV-cache compression for vision-language models (MixKV on SnapKV/PyramidKV/AdaKV/SparseMM)."""

from __future__ import annotations

from typing import Any

from mixkv import _core

__version__: str = _core.__version__


def cuda_available() -> bool:
    """True when CUDA kernels were compiled into this build and a CUDA device can run them."""
    return bool(_core.cuda_available())


def cuda_compiled() -> bool:
    """True when this build carries CUDA kernels (whether or not a GPU is present)."""
    return bool(_core.cuda_compiled())


_LAZY: dict[str, tuple[str, str]] = {
    "MixKVCache": ("mixkv.cache", "MixKVCache"),
    "load_sparsemm_table": ("mixkv.tables", "load_sparsemm_table"),
    "load_redundancy_table": ("mixkv.tables", "load_redundancy_table"),
}


def __getattr__(name: str) -> Any:
    """Import the transformers integration on first use (``import mixkv`` stays light)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mixkv' has no attribute {name!r}")


__all__ = [
    "MixKVCache",
    "__version__",
    "cuda_available",
    "cuda_compiled",
    "load_redundancy_table",
    "load_sparsemm_table",
]
