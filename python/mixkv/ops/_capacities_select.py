"""Capacities and selection in one call: the budget policy's capacities, then each row's top-c."""

from __future__ import annotations

import torch

from mixkv import _core
from mixkv._checks import check_last_dim_contiguous, check_tensor
from mixkv._runtime import call, stream_handle, workspace
from mixkv.ops._budget import POLICIES, prepare_capacities
from mixkv.ops._select import check_outputs


def capacities_select_into(
    policy: str,
    importance: torch.Tensor,
    scores: torch.Tensor,
    *,
    budget: int,
    window: int,
    layer_idx: int,
    num_layers: int,
    capacities: torch.Tensor,
    positions: torch.Tensor,
    counts: torch.Tensor,
    valid_lengths: torch.Tensor | None = None,
    validate: bool = True,
    **policy_options: object,
) -> None:
    """:func:`capacities_into` of ``importance`` then :func:`select_into` of ``scores``, in one call.

    Same arguments and results as the two: ``capacities`` (int32 ``[B, Hkv]``) receives the
    capacities, ``positions`` / ``counts`` the selection by ``scores`` (float32, the shape of
    ``importance``; it may be the same tensor). On CUDA, AdaKV keeps each row's top
    ``min(Hkv * base, P)`` scores in the launch that ranks the importance (no capacity can exceed
    that many) and then picks each row's top ``c`` among them, instead of a full-row selection
    after the capacities, where both sets of rows fit one block per multiprocessor (few sequences
    and kv heads). ``validate=False`` skips the checks that read tensor values (see both
    functions); the capacities are then clamped to ``positions``' columns on CUDA. With
    ``validate=True`` a capacity above ``positions``' columns raises ``ValueError`` (on CUDA
    after the call, which reads the capacities back).
    """
    leading, (imp, lengths, head_scores, caps) = prepare_capacities(
        policy,
        importance,
        budget=budget,
        window=window,
        layer_idx=layer_idx,
        num_layers=num_layers,
        out=capacities,
        valid_lengths=valid_lengths,
        validate=validate,
        policy_options=dict(policy_options),
    )
    s = check_tensor("scores", scores, ndim=3, dtypes=(torch.float32,))
    if tuple(s.shape) != tuple(imp.shape):
        raise ValueError(f"scores must have the shape of importance {list(imp.shape)}, got {list(s.shape)}")
    if s.device != imp.device:
        raise ValueError(f"scores is on {s.device} but importance is on {imp.device}; they must share a device")
    s = check_last_dim_contiguous("scores", s)
    pos, cnt = check_outputs(s, positions, counts)
    if validate and s.numel() and bool(torch.isnan(s).any()):
        raise ValueError("scores contains NaN")
    b, h, p = imp.shape
    ws = None
    if policy == "adakv":
        nbytes = _core.capacities_select_workspace_bytes(
            POLICIES.index(policy), budget, window, layer_idx, num_layers, int(leading[8]), b, h, p
        )  # type: ignore[call-overload]
        ws = workspace(nbytes, imp.device)
    call(_core.capacities_select, *leading, imp, s, lengths, head_scores, caps, pos, cnt, ws, stream_handle(imp.device))
    if validate and caps.numel():
        top = int(caps.max())
        if top > pos.shape[2]:
            raise ValueError(f"positions has {pos.shape[2]} columns but capacities reach {top}")
