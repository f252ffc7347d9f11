"""Per-(sequence, kv head) capacities of the budget policies (SPEC §7)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mixkv import _core
from mixkv._checks import FLOAT_DTYPES, check_choice, check_int, check_last_dim_contiguous, check_tensor
from mixkv._runtime import call, stream_handle, workspace

POLICIES: tuple[str, ...] = ("snapkv", "pyramidkv", "adakv", "sparsemm")

# Options of each policy and their defaults.
_DEFAULTS: dict[str, dict[str, object]] = {
    "snapkv": {},
    "pyramidkv": {"beta": 20.0},
    "adakv": {"floor": 0.2, "normalize": True, "skip": 0},
    "sparsemm": {"head_scores": None, "ratio": 0.1},
}


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x


def _resolve_options(policy: str, given: dict[str, object]) -> dict[str, object]:
    known = {name for opts in _DEFAULTS.values() for name in opts}
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for capacities()")
    foreign = sorted(set(given) - set(_DEFAULTS[policy]))
    if foreign:
        owners = {name: p for p, opts in _DEFAULTS.items() for name in opts}
        listed = ", ".join(f"{n} (a {owners[n]} option)" for n in foreign)
        raise TypeError(f"option(s) {listed} do not apply to the {policy} policy")
    opts = dict(_DEFAULTS[policy])
    opts.update(given)
    if "beta" in opts:
        beta = _check_real("beta", opts["beta"])
        if not beta > 0 or math.isinf(beta):
            raise ValueError(f"beta must be a finite number > 0, got {beta}")
        opts["beta"] = beta
    if "floor" in opts:
        alpha = _check_real("floor", opts["floor"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"floor must lie in [0, 1], got {alpha}")
        opts["floor"] = alpha
    if "normalize" in opts and not isinstance(opts["normalize"], bool):
        raise TypeError(f"normalize must be a bool, got {type(opts['normalize']).__name__}")
    if "skip" in opts:
        check_int("skip", opts["skip"], minimum=0)
    if "ratio" in opts:
        ratio = _check_real("ratio", opts["ratio"])
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
        opts["ratio"] = ratio
    return opts


def _layer_head_scores(
    head_scores: object, *, layer_idx: int, num_layers: int, heads: int, device: torch.device, validate: bool
) -> torch.Tensor:
    if head_scores is None:
        raise ValueError("head_scores is required by the sparsemm policy ([num_layers, Hkv] or [Hkv])")
    if not isinstance(head_scores, torch.Tensor):
        raise TypeError(f"head_scores must be a torch.Tensor, got {type(head_scores).__name__}")
    if head_scores.dtype not in (*FLOAT_DTYPES, torch.float64):
        raise TypeError(f"head_scores must be a floating-point tensor, got {head_scores.dtype}")
    if tuple(head_scores.shape) == (num_layers, heads):
        row = head_scores[layer_idx]
    elif tuple(head_scores.shape) == (heads,):
        row = head_scores
    else:
        raise ValueError(
            f"head_scores must have shape [{num_layers}, {heads}] or [{heads}] (num_layers, Hkv), "
            f"got {list(head_scores.shape)}"
        )
    if validate and not bool(torch.isfinite(row).all()):
        raise ValueError("head_scores contains NaN or infinite values")
    return row.to(device=device, dtype=torch.float32).contiguous()


def _valid_lengths(
    valid_lengths: object, batch: int, tokens: int, device: torch.device, validate: bool
) -> torch.Tensor | None:
    if valid_lengths is None:
        return None
    t = check_tensor("valid_lengths", valid_lengths, ndim=1, dtypes=(torch.int32, torch.int64))
    if t.shape[0] != batch:
        raise ValueError(f"valid_lengths must have shape [{batch}] (one per sequence), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"valid_lengths is on {t.device} but importance is on {device}; they must share a device")
    if validate and t.numel() and (int(t.min()) < 1 or int(t.max()) > tokens):
        raise ValueError(f"valid_lengths must lie in [1, {tokens}] (P + window), got {t.tolist()}")
    return t.to(torch.int32)


def _check_importance(imp: torch.Tensor, policy: str, window: int, lengths: torch.Tensor | None) -> None:
    """The value checks (one device synchronisation on CUDA)."""
    if imp.numel() == 0:
        return
    if bool(torch.isnan(imp).any()):
        raise ValueError("importance contains NaN")
    if policy != "adakv":
        return
    p = imp.shape[2]
    finite = torch.isfinite(imp)
    if lengths is not None:
        prefix = (lengths.to(torch.int64) - window).clamp(min=0)
        cols = torch.arange(p, device=imp.device)
        inside = cols[None, :] >= (p - prefix)[:, None]  # [B, P]: the valid prefix columns
        finite = finite | ~inside[:, None, :]
    if not bool(finite.all()):
        raise ValueError("importance must be finite over each sequence's valid prefix (adakv)")


class PolicyArguments(NamedTuple):
    """A policy's checked layer arguments and options."""

    leading: tuple[object, ...]  # the core's leading arguments: policy through its options
    options: dict[str, object]
    window: int
    layer_idx: int
    num_layers: int


def policy_arguments(
    policy: str,
    budget: object,
    window: object,
    layer_idx: object,
    num_layers: object,
    policy_options: dict[str, object],
) -> PolicyArguments:
    """Checks a policy, its layer arguments and its options."""
    check_choice("policy", policy, POLICIES)
    budget = check_int("budget", budget, minimum=1)
    window = check_int("window", window, minimum=1)
    num_layers = check_int("num_layers", num_layers, minimum=1)
    layer_idx = check_int("layer_idx", layer_idx, minimum=0)
    if layer_idx >= num_layers:
        raise ValueError(f"layer_idx must lie in [0, {num_layers}) (num_layers), got {layer_idx}")
    opts = _resolve_options(policy, dict(policy_options))
    leading = (
        POLICIES.index(policy),
        budget,
        window,
        layer_idx,
        num_layers,
        float(opts.get("beta", 20.0)),  # type: ignore[arg-type]
        float(opts.get("floor", 0.2)),  # type: ignore[arg-type]
        bool(opts.get("normalize", True)),
        int(opts.get("skip", 0)),  # type: ignore[call-overload]
        float(opts.get("ratio", 0.1)),  # type: ignore[arg-type]
    )
    return PolicyArguments(leading, opts, window, layer_idx, num_layers)


def prepare_capacities(
    policy: str,
    importance: object,
    *,
    budget: object,
    window: object,
    layer_idx: object,
    num_layers: object,
    out: object,
    valid_lengths: object,
    validate: bool,
    policy_options: dict[str, object],
) -> tuple[tuple[object, ...], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
    """Checks the arguments of :func:`capacities_into`.

    Returns the core's leading arguments (policy through its options) and its tensors
    (importance, valid lengths, head scores, out).
    """
    args = policy_arguments(policy, budget, window, layer_idx, num_layers, policy_options)
    imp = check_tensor("importance", importance, ndim=3, dtypes=(torch.float32,))
    check_last_dim_contiguous("importance", imp)
    b, h, p = imp.shape
    o = check_tensor("out", out, ndim=2, dtypes=(torch.int32,))
    if tuple(o.shape) != (b, h):
        raise ValueError(f"out must have shape [{b}, {h}], got {list(o.shape)}")
    if o.device != imp.device:
        raise ValueError(f"out is on {o.device} but importance is on {imp.device}; they must share a device")
    lengths = _valid_lengths(valid_lengths, b, p + args.window, imp.device, validate)
    scores_row = None
    if policy == "sparsemm":
        scores_row = _layer_head_scores(
            args.options["head_scores"],
            layer_idx=args.layer_idx,
            num_layers=args.num_layers,
            heads=h,
            device=imp.device,
            validate=validate,
        )
    if validate:
        _check_importance(imp, policy, args.window, lengths)
    return args.leading, (imp, lengths, scores_row, o)


def capacities_into(
    policy: str,
    importance: torch.Tensor,
    *,
    budget: int,
    window: int,
    layer_idx: int,
    num_layers: int,
    out: torch.Tensor,
    valid_lengths: torch.Tensor | None = None,
    validate: bool = True,
    **policy_options: object,
) -> None:
    """Write the capacities of ``policy`` into ``out`` (int32 ``[B, Hkv]``); see :func:`capacities`.

    ``validate=False`` skips the checks that read tensor values (NaN, valid_lengths range,
    head_scores finiteness), which would synchronise a CUDA device.
    """
    leading, (imp, lengths, scores_row, o) = prepare_capacities(
        policy,
        importance,
        budget=budget,
        window=window,
        layer_idx=layer_idx,
        num_layers=num_layers,
        out=out,
        valid_lengths=valid_lengths,
        validate=validate,
        policy_options=dict(policy_options),
    )
    b, h, p = imp.shape
    ws = workspace(_core.capacities_workspace_bytes(b, h, p), imp.device) if policy == "adakv" else None
    call(_core.capacities, *leading, imp, lengths, scores_row, o, ws, stream_handle(imp.device))


def capacities(
    policy: str,
    importance: torch.Tensor,
    *,
    budget: int,
    window: int,
    layer_idx: int,
    num_layers: int,
    valid_lengths: torch.Tensor | None = None,
    **policy_options: object,
) -> torch.Tensor:
    """Prefix tokens each ``(sequence, kv head)`` keeps under ``policy``: int32 ``[B, Hkv]``.

    ``importance`` float32 ``[B, Hkv, P]`` is the pooled window attention over the prefix
    (``P = N - window``; padding ``-inf``); AdaKV ranks its values, every policy takes ``P``
    from its shape. ``budget`` counts the window too (``base = budget - window``).
    ``valid_lengths`` int ``[B]`` gives each left-padded sequence's token count ``n_b``; its
    prefix is ``max(n_b - window, 0)`` and every capacity lies in ``[0, prefix]``.
    Options: ``beta`` (pyramidkv, 20), ``floor`` (adakv, 0.2), ``normalize`` (adakv, True),
    ``skip`` (adakv, 0), ``head_scores`` (sparsemm, required: ``[num_layers, Hkv]`` or this
    layer's ``[Hkv]``, normalised and summed per GQA group), ``ratio`` (sparsemm, 0.1).
    """
    imp = check_tensor("importance", importance, ndim=3, dtypes=(torch.float32,))
    out = torch.empty(tuple(imp.shape[:2]), dtype=torch.int32, device=imp.device)
    capacities_into(
        policy,
        imp,
        budget=budget,
        window=window,
        layer_idx=layer_idx,
        num_layers=num_layers,
        out=out,
        valid_lengths=valid_lengths,
        **policy_options,
    )
    return out


def capacity_bound(
    policy: str,
    *,
    budget: int,
    window: int,
    layer_idx: int,
    num_layers: int,
    num_kv_heads: int,
    prefix: int,
    **policy_options: object,
) -> int:
    """The largest capacity :func:`capacities` can give any ``(sequence, kv head)`` of this layer.

    Whatever the importance and valid lengths, for ``num_kv_heads`` heads and ``prefix`` (``P``)
    columns: a column count for the positions of the selection that follows (fewer columns, less
    padding written, and on CUDA the short selection path). snapkv ``min(base, P)``, pyramidkv
    ``min(2 base - floor(base / beta), P)``, adakv ``min(Hkv base, P)`` (``base`` below ``skip``),
    sparsemm ``P``. Same options as :func:`capacities` (``head_scores`` is not read).
    """
    args = policy_arguments(policy, budget, window, layer_idx, num_layers, dict(policy_options))
    heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
    columns = check_int("prefix", prefix, minimum=0)
    return int(_core.capacity_bound(*args.leading, heads, columns))  # type: ignore[call-overload]
