"""The "mixkv" attention implementation, registered in transformers' attention and mask registries.

A model's text decoder is switched to the registered name ``"mixkv"`` (``set_attn_implementation``
with a per-sub-config dict, so vision towers keep theirs). The registered function serves a call
itself only when the key tensor it receives is the one a ``MixKVCache`` layer's ``update()`` has
just returned (an identity check); every other call goes, unchanged, to the implementation the
text decoder had before (sdpa, eager, flash attention), and the registered mask function builds the
masks that implementation expects. A model switched once therefore still behaves exactly as before
with any other cache.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from mixkv.adapters import TextModelSpec

ATTENTION_NAME: str = "mixkv"

# Implementations a text decoder may have before the switch (the ones "mixkv" can delegate to).
DELEGATE_IMPLEMENTATIONS: tuple[str, ...] = (
    "sdpa",
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class AttentionLayer(Protocol):
    """What the registered function needs from a cache layer that claimed a call.

    The layer looks up the model's original implementation itself (:func:`delegate_for`) when it
    needs it: a decode step never does, and skips the lookup.
    """

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


# id(config) -> (weak reference to the config, implementation it had before the switch)
_originals: dict[int, tuple[weakref.ref[Any], str]] = {}
# id(key tensor) -> (weak reference to that tensor, weak reference to the layer that returned it)
_handoffs: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[Any]]] = {}


def _drop_handoff(tensor_id: int, ref: weakref.ref[torch.Tensor]) -> None:
    entry = _handoffs.get(tensor_id)
    if entry is not None and entry[0] is ref:
        del _handoffs[tensor_id]


def hand_off(key: torch.Tensor, layer: AttentionLayer) -> None:
    """Mark ``key`` (just returned by ``layer.update``) so that the attention call receiving it goes to ``layer``."""
    tensor_id = id(key)
    ref = weakref.ref(key, lambda r, i=tensor_id: _drop_handoff(i, r))
    _handoffs[tensor_id] = (ref, weakref.ref(layer))


def withdraw(layer: AttentionLayer) -> None:
    """Forget every pending hand-off of ``layer`` (after a reset)."""
    for tensor_id, (_, layer_ref) in list(_handoffs.items()):
        if layer_ref() is layer:
            del _handoffs[tensor_id]


def _claim(key: torch.Tensor) -> AttentionLayer | None:
    entry = _handoffs.get(id(key))
    if entry is None or entry[0]() is not key:
        return None
    del _handoffs[id(key)]
    return entry[1]()


def _original_name(config: object) -> str:
    entry = _originals.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    return "sdpa"


def _eager_for(module: torch.nn.Module) -> AttentionFn:
    """The eager attention of the module's own modeling file (each model family defines its own)."""
    modeling = sys.modules.get(type(module).__module__)
    fn = getattr(modeling, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def delegate_for(module: torch.nn.Module) -> AttentionFn:
    """The attention implementation ``module``'s text decoder had before the switch to "mixkv"."""
    name = _original_name(getattr(module, "config", None))
    eager = _eager_for(module)
    if name == "eager":
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def mixkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of a switched text decoder: a MixKVCache layer when it returned ``key``, else the original."""
    layer = _claim(key)
    if layer is None:
        return delegate_for(module)(module, query, key, value, attention_mask, **kwargs)
    return layer.attention(module, query, key, value, attention_mask, **kwargs)


def mixkv_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask creation of a switched text decoder: exactly what its original implementation builds."""
    name = _original_name(kwargs.get("config"))
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, **kwargs)


def register() -> None:
    """Register "mixkv" in transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, mixkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, mixkv_mask)


def install(model: Any, spec: TextModelSpec) -> None:
    """Switch the text decoder of ``model`` to "mixkv" (idempotent; other sub-models keep theirs)."""
    register()
    config = spec.config
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return
    if current not in DELEGATE_IMPLEMENTATIONS:
        raise ValueError(
            f"the text decoder uses attn_implementation={current!r}; MixKVCache works on top of one of "
            f"{', '.join(map(repr, DELEGATE_IMPLEMENTATIONS))}"
        )
    _originals[id(config)] = (weakref.ref(config), current)
    _set_text_attention(model, spec, ATTENTION_NAME)
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        del _originals[id(config)]
        raise ValueError(
            f"could not switch the attention of this {spec.model_type!r} model's text decoder: its modeling code "
            "does not dispatch attention through transformers' AttentionInterface"
        )


def uninstall(model: Any, spec: TextModelSpec) -> None:
    """Give the text decoder of ``model`` its original attention implementation back."""
    config = spec.config
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        return
    _set_text_attention(model, spec, _original_name(config))
    _originals.pop(id(config), None)


def _set_text_attention(model: Any, spec: TextModelSpec, name: str) -> None:
    if spec.sub_config_key is None:
        model.set_attn_implementation(name)
    else:
        model.set_attn_implementation({spec.sub_config_key: name})


# The last mask read by valid_lengths_from_mask and its answer: every decoder layer of one forward
# receives the same mask object, so the padding is read from the device once per forward.
_last_mask: tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor | None] | None = None


def valid_lengths_from_mask(attention_mask: object, batch: int, length: int) -> torch.Tensor | None:
    """Non-padding token counts int32 [B] of a left-padded prefill, read from the mask the model built.

    Accepts the masks of every delegate: None (no padding), 4-D boolean (sdpa: True = attend),
    4-D additive float (eager: 0 = attend) and 2-D padding masks (flash attention). Returns None
    when no sequence is padded. Refuses anything that is not left padding. One device
    synchronisation per mask object (the answer is kept for the next layers of the same forward).
    """
    global _last_mask
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        kind = type(attention_mask).__name__
        raise ValueError(f"MixKVCache cannot read padding from an attention mask of type {kind}")
    memo = _last_mask
    if memo is not None and memo[0]() is attention_mask and memo[1:3] == (batch, length):
        return memo[3]
    counts = _read_valid_lengths(attention_mask, batch, length)
    _last_mask = (weakref.ref(attention_mask), batch, length, counts)
    return counts


def _read_valid_lengths(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :length]  # the last query sees exactly the valid keys
    elif attention_mask.dim() == 2:
        row = attention_mask[:, -length:]
    else:
        shape = tuple(attention_mask.shape)
        raise ValueError(f"MixKVCache cannot read padding from an attention mask of shape {shape}")
    if row.dtype == torch.bool:
        valid = row
    elif row.is_floating_point():
        valid = row > torch.finfo(row.dtype).min / 2
    else:
        valid = row != 0
    if valid.shape[0] == 1 and batch > 1:
        valid = valid.expand(batch, -1)
    if valid.shape != (batch, length):
        shape = tuple(attention_mask.shape)
        raise ValueError(f"attention mask of shape {shape} does not match {batch} sequences x {length} keys")
    counts = valid.sum(dim=-1)
    positions = torch.arange(length, device=valid.device)
    expected = positions[None, :] >= (length - counts)[:, None]
    left_padded = (valid == expected).all()
    host = torch.cat([left_padded.view(1).to(counts.dtype), counts]).cpu()  # the one synchronisation
    if not bool(host[0]):
        raise ValueError("MixKVCache needs left padding (padding first, then the prompt); use padding_side='left'")
    host_counts = host[1:]
    if int(host_counts.min()) < 1:
        raise ValueError("every sequence of the batch needs at least one non-padding token")
    if int(host_counts.min()) == length:
        return None
    return counts.to(torch.int32)
