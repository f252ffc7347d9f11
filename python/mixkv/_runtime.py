"""Glue between torch and the core: streams and caller-allocated workspaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.dlpack import to_dlpack

R = TypeVar("R")


# The current stream as an integer without building a Stream object (a few microseconds less per
# call); the public route below where this torch build lacks the raw accessor.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    if _RAW_STREAM is not None:
        return int(_RAW_STREAM(device.index if device.index is not None else torch.cuda.current_device()))
    return int(torch.cuda.current_stream(device).cuda_stream)


def workspace(nbytes: int, device: torch.device) -> torch.Tensor | None:
    """A byte workspace from torch's allocator (the core never allocates device memory)."""
    if device.type != "cuda" or nbytes <= 0:
        return None
    return torch.empty(int(nbytes), dtype=torch.uint8, device=device)


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the host tensor ``host`` on ``device`` that does not synchronise the device.

    On CUDA the data goes through pinned memory with a non-blocking copy on the current stream
    (torch keeps the pinned buffer alive until the copy has run).
    """
    if device.type != "cuda":
        return host.to(device)
    return host.contiguous().pin_memory().to(device, non_blocking=True)


def call(fn: Callable[..., R], *args: object) -> R:
    """Call a core function, handing its tensor arguments over as DLPack capsules.

    ``torch.utils.dlpack.to_dlpack`` exports a tensor in about a microsecond, while the
    ``__dlpack__`` protocol the bindings would otherwise use costs several (it runs Python-level
    checks in torch); ops take six to ten tensors per call, on every decode step. No stream
    synchronisation is involved either way: the core runs on the stream it is given.
    """
    return fn(*[to_dlpack(a) if isinstance(a, torch.Tensor) else a for a in args])
