"""MixKVCache: a transformers Cache that compresses each layer's prompt keys and values at prefill.

Usage::

    cache = MixKVCache(model, policy="adakv", mix=True, budget=64)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=128)  # "cache=" from transformers 5.24

Prefill runs the model's own attention for its output, then keeps, per (sequence, kv head), the
tokens the budget policy and the score select plus the observation window, in a varlen store.
Decoding appends to the store and attends over it. Sequence lengths reported to the model are the
uncompressed ones, so positions (RoPE, Qwen2-VL's M-RoPE) stay right.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mixkv import _attention
from mixkv._checks import check_choice, check_int
from mixkv._runtime import to_device_async
from mixkv.adapters import TextModelSpec, text_model_spec
from mixkv.ops import (
    GQA_REDUCTIONS,
    METHODS,
    POLICIES,
    POOLINGS,
    capacities_select_into,
    capacity_bound,
    compute_scores,
)
from mixkv.store import VarlenKVStore
from mixkv.tables import TableSource, load_redundancy_table, load_sparsemm_table

BACKENDS: tuple[str, ...] = ("auto", "mixkv", "flash", "torch")
OPTIONS: tuple[str, ...] = (
    "policy",
    "mix",
    "budget",
    "window",
    "pooling",
    "kernel_size",
    "gqa",
    "floor",
    "normalize",
    "skip",
    "beta",
    "sparsemm_table",
    "sparsemm_ratio",
    "redundancy_table",
    "backend",
    "reserve",
    "record",
)


@dataclass(frozen=True)
class CompressionSettings:
    """Validated options shared by every layer of one cache."""

    policy: str
    method: str
    budget: int
    window: int
    pooling: str
    kernel_size: int
    gqa: str
    floor: float
    normalize: bool
    skip: int
    beta: float
    sparsemm_ratio: float
    backend: str
    reserve: int | None
    record: bool
    num_layers: int
    head_scores: torch.Tensor | None  # [L, Hkv] float32 (SparseMM)
    redundancy: torch.Tensor | None  # [L, Hkv] float32 (offline r)

    def policy_options(self) -> dict[str, Any]:
        """The capacities() keywords of this policy."""
        if self.policy == "pyramidkv":
            return {"beta": self.beta}
        if self.policy == "adakv":
            return {"floor": self.floor, "normalize": self.normalize, "skip": self.skip}
        if self.policy == "sparsemm":
            return {"head_scores": self.head_scores, "ratio": self.sparsemm_ratio}
        return {}


@dataclass
class PrefillRecord:
    """What one layer's prefill compression saw and decided (kept when the cache has ``record=True``)."""

    window: int  # W used (N when the prompt was not longer than the window)
    valid_lengths: torch.Tensor | None  # int32 [B] (None: no padding)
    scores: torch.Tensor | None  # float32 [B, Hkv, N - W] (None: nothing was scored)
    importance: torch.Tensor | None  # float32 [B, Hkv, N - W] pooled window attention A
    capacities: torch.Tensor | None  # int32 [B, Hkv] prefix tokens kept


class DeviceTables:
    """The offline tables of one cache (host tensors), moved to a device once and shared by every layer.

    The move does not synchronise the device (pinned memory, non-blocking copy).
    """

    def __init__(self, **tables: torch.Tensor | None) -> None:
        self._host = tables
        self._moved: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, device: torch.device) -> torch.Tensor | None:
        host = self._host[name]
        if host is None:
            return None
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = to_device_async(host, device)
        return self._moved[key]


class MixKVLayer(CacheLayerMixin):
    """One decoder layer: full keys/values until its prefill attention ran, then a varlen store."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, settings: CompressionSettings, layer_idx: int, tables: DeviceTables | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.tables = tables or DeviceTables(head_scores=settings.head_scores, redundancy=settings.redundancy)
        self.layer_idx = layer_idx
        self.store: VarlenKVStore | None = None
        self.seq_length = 0
        self.record: PrefillRecord | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # prefill K/V awaiting compression
        self._decode: tuple[torch.Tensor, torch.Tensor] | None = None  # decode K/V awaiting the store
        self._awaiting_attention = False
        self._warned_sliding = False
        self._scale: float | None = None  # the last scaling checked (a module's scaling is constant)

    # --- transformers layer protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the new tokens; the attention call that receives the returned keys is served by this layer."""
        if self._awaiting_attention:
            raise RuntimeError(
                f"MixKVCache layer {self.layer_idx}: the previous update was never followed by mixkv attention; "
                "the model's text attention must run with attn_implementation='mixkv' (MixKVCache(model) sets it)"
            )
        if self.store is None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._pending = (key_states, value_states)
        else:
            # appended by the attention call, in the same core call as the attention over the store
            self._decode = (key_states, value_states)
        self.seq_length += key_states.shape[-2]
        self._awaiting_attention = True
        _attention.hand_off(key_states, self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (uncompressed), so that positions stay those of the full sequence."""
        return self.seq_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        _attention.withdraw(self)
        self.store = None
        self.seq_length = 0
        self.record = None
        self._pending = None
        self._decode = None
        self._awaiting_attention = False
        self.is_initialized = False

    def offload(self) -> None:
        """Offloading is not supported; the store stays where it is."""

    def prefetch(self) -> None:
        """Offloading is not supported; nothing to bring back."""

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("MixKVCache cannot crop (compressed tokens cannot be rolled back)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            batch = self.store.batch_size
            self._select_batch(torch.arange(batch).repeat_interleave(repeats))

    def _select_batch(self, indices: torch.Tensor) -> None:
        if self._pending is not None or self._decode is not None:
            raise RuntimeError("MixKVCache cannot reorder its batch between an update and the attention call")
        if self.store is None:
            return
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        self.store.reorder(index.to(torch.long))

    # --- inspection ------------------------------------------------------------------------------
    def lengths(self) -> torch.Tensor:
        """Tokens held per (sequence, kv head), int32 [B, Hkv]."""
        if self.store is None:
            raise RuntimeError(f"layer {self.layer_idx} holds nothing yet (no prefill ran)")
        self._flush()
        return self.store.lengths

    @property
    def nbytes(self) -> int:
        if self.store is None:
            return 0
        self._flush()
        return int(self.store.nbytes)

    def _flush(self) -> None:
        """Append the decode tokens of an update whose attention call has not run yet (inspection only)."""
        if self._decode is not None and self.store is not None:
            keys, values = self._decode
            self._decode = None
            self.store.append(keys, values)

    # --- attention (called by the registered "mixkv" function) -----------------------------------
    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._awaiting_attention = False
        scaling = kwargs.get("scaling")
        if self._pending is not None:
            keys, values = self._pending
            self._pending = None
            output = _attention.delegate_for(module)(module, query, key, value, attention_mask, **kwargs)
            self._compress(query, keys, values, attention_mask, scaling)
            return output
        store = self.store
        assert store is not None
        if self.layer_idx == 0 and not self._warned_sliding:
            self._warn_sliding(kwargs.get("sliding_window"))
        if scaling is not None and scaling is not self._scale:
            # checked once per value (the model passes its module's constant scaling every step)
            if isinstance(scaling, bool) or not isinstance(scaling, int | float) or scaling == 0:
                raise ValueError(f"scale must be a non-zero number or None, got {scaling!r}")
            self._scale = scaling
        pending = self._decode
        backend = self.settings.backend
        if pending is not None and (backend == "auto" or backend == "mixkv"):
            self._decode = None
            return store.append_attend(pending[0], pending[1], query, None if scaling is None else float(scaling)), None
        self._flush()
        out = store.attend(query, scale=scaling, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    def _warn_sliding(self, sliding_window: object) -> None:
        if sliding_window is not None and self.seq_length > sliding_window:
            self._warned_sliding = True
            warnings.warn(
                f"the sequence ({self.seq_length} tokens) is longer than the model's sliding window "
                f"({sliding_window}); MixKVCache attends over every token it kept",
                stacklevel=3,
            )

    def _compress(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        s = self.settings
        batch, num_kv_heads, length, _ = keys.shape
        valid = _attention.valid_lengths_from_mask(attention_mask, batch, length)
        scores: torch.Tensor | None = None
        importance: torch.Tensor | None = None
        caps: torch.Tensor | None = None
        if length <= s.window:
            window = length
            positions = torch.full((batch, num_kv_heads, 1), -1, dtype=torch.int32, device=keys.device)
            counts = torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=keys.device)
        else:
            window = s.window
            need_importance = s.method != "attn" and (s.policy == "adakv" or s.record)
            redundancy = self.tables.get("redundancy", keys.device)
            if redundancy is not None:
                redundancy = redundancy[self.layer_idx : self.layer_idx + 1]
            result = compute_scores(
                query[:, :, length - window :, :],
                keys,
                values,
                method=s.method,
                pooling=s.pooling,
                kernel_size=s.kernel_size,
                gqa=s.gqa,
                redundancy=redundancy,
                valid_lengths=valid,
                scale=scaling,
                need_importance=need_importance,
                validate=False,
            )
            scores = result.scores
            importance = result.importance if result.importance is not None else result.scores
            options = s.policy_options()
            if s.policy == "sparsemm":
                options["head_scores"] = self.tables.get("head_scores", keys.device)
            # The scores, capacities and selection come from this layer's own tensors: no value
            # checks (each would synchronise the device); the store reads the counts once.
            caps = torch.empty((batch, num_kv_heads), dtype=torch.int32, device=keys.device)
            # no capacity of this layer exceeds the policy's bound (at most N - W)
            bound = capacity_bound(
                s.policy,
                budget=s.budget,
                window=window,
                layer_idx=self.layer_idx,
                num_layers=s.num_layers,
                num_kv_heads=num_kv_heads,
                prefix=length - window,
                **options,
            )
            columns = max(bound, 1)
            positions = torch.empty((batch, num_kv_heads, columns), dtype=torch.int32, device=keys.device)
            counts = torch.empty((batch, num_kv_heads), dtype=torch.int32, device=keys.device)
            capacities_select_into(
                s.policy,
                importance,
                scores,
                budget=s.budget,
                window=window,
                layer_idx=self.layer_idx,
                num_layers=s.num_layers,
                capacities=caps,
                positions=positions,
                counts=counts,
                valid_lengths=valid,
                validate=False,
                **options,
            )
        self.store = VarlenKVStore.from_selection(
            keys, values, positions, counts, window, reserve=s.reserve, valid_lengths=valid, validate=False
        )
        if s.record:
            self.record = PrefillRecord(
                window=window, valid_lengths=valid, scores=scores, importance=importance, capacities=caps
            )


def _check_number(name: str, value: object, low: float, high: float, *, include_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    inside = low <= value <= high if include_high else low <= value < high
    if not (math.isfinite(value) and inside):
        raise ValueError(f"{name} must lie in [{low}, {high}{']' if include_high else ')'}, got {value}")
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _method_of(mix: object) -> str:
    if isinstance(mix, bool):
        return "mixkv" if mix else "attn"
    if isinstance(mix, str) and mix in METHODS:
        return mix
    raise ValueError(f"mix must be True, False or one of {', '.join(map(repr, METHODS))}; got {mix!r}")


class MixKVCache(Cache):
    """A transformers Cache compressing the text decoder's prompt KV with MixKV on a budget policy.

    Args:
        model: the transformers model that will use the cache (its text decoder is switched to the
            "mixkv" attention implementation, which serves MixKVCache calls and hands every other
            call to the original implementation).
        policy: budget policy, one of "snapkv", "pyramidkv", "adakv", "sparsemm".
        mix: True for the MixKV score, False for attention importance alone, or a variant name
            ("attn", "keydiff", "vnorm", "knorm", "uniform-mix", "mixkv").
        budget: tokens kept per (sequence, kv head) and layer, the window included (>= window).
        window: observation window W (the last W prompt tokens, always kept).
        pooling, kernel_size: 1-D pooling of the importance ("avg" or "max"; odd kernel).
        gqa: reduction of a group's query heads ("mean" or "max").
        floor, normalize, skip: AdaKV options (alpha, score normalisation, layers using the base budget).
        beta: PyramidKV's beta.
        sparsemm_table: SparseMM head scores (path, dict or tensor; required for policy="sparsemm").
        sparsemm_ratio: SparseMM's minimum share of the base budget per head.
        redundancy_table: offline head redundancy r (path, dict or tensor); default: online r.
        backend: decode attention of the store: "auto"/"mixkv" (own kernel), "flash" (flash-attn varlen)
            or "torch" (torch's varlen attention); the last two need CUDA and float16/bfloat16.
        reserve: decode tokens to reserve per segment at prefill (None: the store's default).
        record: keep each layer's prefill scores, importance and capacities (``cache.layers[l].record``).
    """

    def __init__(
        self,
        model: Any,
        *,
        policy: str = "snapkv",
        mix: bool | str = True,
        budget: int = 64,
        window: int = 32,
        pooling: str = "avg",
        kernel_size: int = 5,
        gqa: str = "mean",
        floor: float = 0.2,
        normalize: bool = True,
        skip: int = 0,
        beta: float = 20,
        sparsemm_table: TableSource | None = None,
        sparsemm_ratio: float = 0.1,
        redundancy_table: TableSource | None = None,
        backend: str = "auto",
        reserve: int | None = None,
        record: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(
                f"unknown MixKVCache option(s): {', '.join(sorted(unknown))}; allowed options: {', '.join(OPTIONS)}"
            )
        check_choice("policy", policy, POLICIES)
        method = _method_of(mix)
        check_int("window", window, minimum=1)
        check_int("budget", budget, minimum=1)
        if budget < window:
            raise ValueError(f"budget ({budget}) counts the window and must be >= window ({window})")
        check_choice("pooling", pooling, POOLINGS)
        check_int("kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        check_choice("gqa", gqa, GQA_REDUCTIONS)
        floor = _check_number("floor", floor, 0.0, 1.0)
        _check_bool("normalize", normalize)
        check_int("skip", skip, minimum=0)
        beta = _check_number("beta", beta, 0.0, math.inf, include_high=False)
        if beta == 0.0:
            raise ValueError("beta must be > 0")
        sparsemm_ratio = _check_number("sparsemm_ratio", sparsemm_ratio, 0.0, 1.0, include_high=False)
        check_choice("backend", backend, BACKENDS)
        if reserve is not None:
            check_int("reserve", reserve, minimum=0)
        _check_bool("record", record)

        spec = text_model_spec(model)
        head_scores = None
        if policy == "sparsemm":
            if sparsemm_table is None:
                raise ValueError("policy='sparsemm' needs sparsemm_table (the model's SparseMM head-score JSON)")
            head_scores = load_sparsemm_table(
                sparsemm_table, num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads
            )
        elif sparsemm_table is not None:
            raise ValueError(f"sparsemm_table is only used by policy='sparsemm' (policy is {policy!r})")
        redundancy = None
        if redundancy_table is not None:
            redundancy = load_redundancy_table(
                redundancy_table, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads
            )

        self.spec: TextModelSpec = spec
        self.settings = CompressionSettings(
            policy=policy,
            method=method,
            budget=budget,
            window=window,
            pooling=pooling,
            kernel_size=kernel_size,
            gqa=gqa,
            floor=floor,
            normalize=normalize,
            skip=skip,
            beta=beta,
            sparsemm_ratio=sparsemm_ratio,
            backend=backend,
            reserve=reserve,
            record=record,
            num_layers=spec.num_layers,
            head_scores=head_scores,
            redundancy=redundancy,
        )
        tables = DeviceTables(head_scores=head_scores, redundancy=redundancy)
        super().__init__(layers=[MixKVLayer(self.settings, i, tables) for i in range(spec.num_layers)])
        _attention.install(model, spec)

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"MixKVCache(policy={s.policy!r}, method={s.method!r}, budget={s.budget}, window={s.window}, "
            f"layers={len(self.layers)}, seq_length={self.get_seq_length()})"
        )

    def lengths(self, layer_idx: int) -> torch.Tensor:
        """Tokens held by layer ``layer_idx`` per (sequence, kv head), int32 [B, Hkv]."""
        return self.layers[layer_idx].lengths()

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (sum over layers of held tokens x head_dim x 2 x itemsize)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes a full cache of the same tokens would hold (a DynamicCache: B x Hkv x seq_length, padding included)."""
        total = 0
        for layer in self.layers:
            if layer.store is None:
                continue
            batch = layer.store.batch_size
            itemsize = torch.empty((), dtype=layer.dtype).element_size()
            total += batch * self.spec.num_kv_heads * layer.seq_length * self.spec.head_dim * 2 * itemsize
        return total

    @staticmethod
    def uninstall(model: Any) -> None:
        """Give ``model``'s text decoder back its original attention implementation."""
        _attention.uninstall(model, text_model_spec(model))
