"""Model adapters: where a model keeps its text decoder and what shape its attention has.

An adapter answers the few model-specific questions the cache needs: which (sub-)config drives the
text decoder (its attention implementation is the one switched to mixkv; vision towers keep
theirs), how many decoder layers there are, and the query/key-value head counts and head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Model types whose text decoders were checked end to end (generate with a compressed cache).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "qwen2_vl",
    "llava_next",
    "internvl",
    "qwen2",
    "mistral",
    "llama",
)

# Text-decoder layer kinds the cache can hold (the others keep no per-token keys and values).
_ATTENTION_LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class TextModelSpec:
    """The text decoder of a model, as the cache sees it."""

    model_type: str
    config: object  # the text decoder's config object (shared with its attention modules)
    sub_config_key: str | None  # the key of ``config`` among the model config's sub-configs; None: top level
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None

    @property
    def group_size(self) -> int:
        """Query heads per key-value head (GQA)."""
        return self.num_heads // self.num_kv_heads


def _positive_int(config: object, name: str, model_type: str) -> int:
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the text config of this {model_type!r} model has no usable {name} (got {value!r})")
    return value


def text_model_spec(model: object) -> TextModelSpec:
    """Find the text decoder of ``model`` (a transformers ``PreTrainedModel``) and describe it."""
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(config, "get_text_config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    text_config = config.get_text_config(decoder=True)
    sub_config_key: str | None = None
    if text_config is not config:
        for key in getattr(config, "sub_configs", {}):
            if getattr(config, key, None) is text_config:
                sub_config_key = key
                break
        if sub_config_key is None:
            raise ValueError(f"could not locate the text decoder's sub-config of this {model_type!r} model")

    num_layers = _positive_int(text_config, "num_hidden_layers", model_type)
    num_heads = _positive_int(text_config, "num_attention_heads", model_type)
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )
    head_dim = getattr(text_config, "head_dim", None)
    if head_dim is None:
        head_dim = _positive_int(text_config, "hidden_size", model_type) // num_heads
    layer_types = getattr(text_config, "layer_types", None) or ()
    unsupported = sorted({t for t in layer_types if t not in _ATTENTION_LAYER_TYPES})
    if unsupported:
        raise ValueError(f"the text decoder has layer types the cache cannot hold: {', '.join(unsupported)}")
    sliding_window = getattr(text_config, "sliding_window", None)
    if layer_types and "sliding_attention" not in layer_types:
        sliding_window = None
    return TextModelSpec(
        model_type=model_type,
        config=text_config,
        sub_config_key=sub_config_key,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        sliding_window=sliding_window if isinstance(sliding_window, int) else None,
    )
