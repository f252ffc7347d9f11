"""Per-(sequence, head) top-c selection of prefix positions (SPEC §6)."""

from __future__ import annotations

import torch

from mixkv import _core
from mixkv._checks import check_last_dim_contiguous, check_tensor
from mixkv._runtime import call, stream_handle, workspace

_CAPACITY_DTYPES = (torch.int32, torch.int64)


def _check_inputs(scores: object, capacities: object) -> tuple[torch.Tensor, torch.Tensor]:
    s = check_tensor("scores", scores, ndim=3, dtypes=(torch.float32,))
    c = check_tensor("capacities", capacities, ndim=2, dtypes=_CAPACITY_DTYPES)
    if tuple(c.shape) != tuple(s.shape[:2]):
        raise ValueError(
            f"capacities must have shape {list(s.shape[:2])} (scores' first two dimensions), got {list(c.shape)}"
        )
    if c.device != s.device:
        raise ValueError(f"capacities is on {c.device} but scores is on {s.device}; they must share a device")
    return check_last_dim_contiguous("scores", s), c.to(torch.int32)


def _check_values(scores: torch.Tensor, capacities: torch.Tensor, columns: int) -> None:
    """The checks that read tensor contents (one device synchronisation on CUDA)."""
    if scores.numel() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contains NaN")
    if capacities.numel():
        lo, hi = int(capacities.min()), int(capacities.max())
        p = scores.shape[2]
        if lo < 0 or hi > p:
            raise ValueError(f"capacities must lie in [0, {p}] (P = scores.shape[2]), got values in [{lo}, {hi}]")
        if hi > columns:
            raise ValueError(f"positions has {columns} columns but capacities reach {hi}")


def check_outputs(scores: torch.Tensor, positions: object, counts: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the output buffers of a selection over ``scores`` ``[B, H, P]``."""
    pos = check_tensor("positions", positions, ndim=3, dtypes=(torch.int32,))
    cnt = check_tensor("counts", counts, ndim=2, dtypes=(torch.int32,))
    b, h, _ = scores.shape
    if tuple(pos.shape[:2]) != (b, h):
        raise ValueError(f"positions must have shape [{b}, {h}, C], got {list(pos.shape)}")
    if tuple(cnt.shape) != (b, h):
        raise ValueError(f"counts must have shape [{b}, {h}], got {list(cnt.shape)}")
    for name, t in (("positions", pos), ("counts", cnt)):
        if t.device != scores.device:
            raise ValueError(f"{name} is on {t.device} but scores is on {scores.device}; they must share a device")
    check_last_dim_contiguous("positions", pos)
    return pos, cnt


def select_into(
    scores: torch.Tensor,
    capacities: torch.Tensor,
    positions: torch.Tensor,
    counts: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Write the top-``c`` positions of every ``(b, h)`` row of ``scores`` into caller buffers.

    ``scores`` float32 ``[B, H, P]`` (``-inf`` marks padding, never selected), ``capacities``
    int32/int64 ``[B, H]`` in ``[0, P]``; ``positions`` int32 ``[B, H, C]`` with ``C`` at least
    the largest capacity receives the chosen positions in ascending order (ties to the lower
    position) followed by ``-1``; ``counts`` int32 ``[B, H]`` receives how many are valid.
    ``validate=False`` skips only the checks that read values (NaN in ``scores``, capacity
    range), which would synchronise a CUDA device; the kernel then clamps capacities to
    ``[0, min(P, C)]``.
    """
    s, c = _check_inputs(scores, capacities)
    pos, cnt = check_outputs(s, positions, counts)
    b, h, p = s.shape
    if validate:
        _check_values(s, c, pos.shape[2])
    ws = workspace(_core.select_workspace_bytes(b, h, p), s.device)
    call(_core.select, s, c, pos, cnt, ws, stream_handle(s.device))


def select(scores: torch.Tensor, capacities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``c`` positions per ``(b, h)`` row: ``(positions [B, H, max(c)], counts [B, H])``.

    Positions are ascending within a row and padded with ``-1`` after ``counts[b, h]`` entries;
    ties go to the lower position and ``-inf`` scores are never selected.
    """
    s, c = _check_inputs(scores, capacities)
    columns = int(c.max()) if c.numel() else 0
    _check_values(s, c, max(columns, 0))
    b, h, _ = s.shape
    positions = torch.empty((b, h, max(columns, 0)), dtype=torch.int32, device=s.device)
    counts = torch.empty((b, h), dtype=torch.int32, device=s.device)
    select_into(s, c, positions, counts, validate=False)
    return positions, counts
