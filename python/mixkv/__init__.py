"""mixkv: KV-cache compression for vision-language models (MixKV on SnapKV/PyramidKV/AdaKV/SparseMM)."""

from __future__ import annotations

from mixkv import _core

__version__: str = _core.__version__


def cuda_available() -> bool:
    """True when CUDA kernels were compiled into this build and a CUDA device can run them."""
    return bool(_core.cuda_available())


def cuda_compiled() -> bool:
    """True when this build carries CUDA kernels (whether or not a GPU is present)."""
    return bool(_core.cuda_compiled())


__all__ = ["__version__", "cuda_available", "cuda_compiled"]
