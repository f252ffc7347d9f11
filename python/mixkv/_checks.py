"""Input validation shared by the public API: every error names the argument it is about."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of rank ``ndim`` (and one of ``dtypes``); return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {str(value.dtype).replace('torch.', '')}")
    if value.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {value.device}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that every given tensor sits on one device; return it."""
    device: torch.device | None = None
    first = ""
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}; they must share a device")
    assert device is not None
    return device


def check_finite(name: str, value: torch.Tensor) -> None:
    """Reject NaN and infinities (one device sync on CUDA)."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_last_dim_contiguous(name: str, value: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of the last dimension as contiguous vectors; other strides are free."""
    if value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {value.stride()}")
    return value


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Check a Python integer (bools refused) and an optional lower bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """Check a string option against its allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_valid_lengths(
    valid_lengths: object, batch: int, n: int, device: torch.device, *, read_values: bool = True
) -> torch.Tensor | None:
    """Per-sequence valid (non-padding, left-padded) token counts: int [B], each in [1, N].

    ``read_values=False`` skips the range check, the one part that reads the values (a device
    synchronisation on CUDA); callers that built the counts themselves use it.
    """
    if valid_lengths is None:
        return None
    t = check_tensor("valid_lengths", valid_lengths, ndim=1, dtypes=(torch.int32, torch.int64))
    if t.shape[0] != batch:
        raise ValueError(f"valid_lengths must have shape [{batch}] (one per sequence), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"valid_lengths is on {t.device} but the inputs are on {device}")
    if read_values and t.numel() and (int(t.min()) < 1 or int(t.max()) > n):
        raise ValueError(f"valid_lengths must lie in [1, {n}], got {t.tolist()}")
    return t.to(torch.int32).contiguous()
