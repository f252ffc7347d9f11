"""The benchmarked models: shipped real-dimension configs, families, and random-weight construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its shipped config directory and its prompt family."""

    name: str
    family: str  # "llava_next" | "qwen2_vl" | "internvl"
    label: str


MODELS: dict[str, ModelSpec] = {
    "llava-next-mistral-7b": ModelSpec("llava-next-mistral-7b", "llava_next", "LLaVA-NeXT-Mistral-7B"),
    "qwen2-vl-7b": ModelSpec("qwen2-vl-7b", "qwen2_vl", "Qwen2-VL-7B"),
    "internvl3-8b": ModelSpec("internvl3-8b", "internvl", "InternVL3-8B"),
}

ALIASES: dict[str, str] = {
    "llava": "llava-next-mistral-7b",
    "llava-next": "llava-next-mistral-7b",
    "qwen": "qwen2-vl-7b",
    "qwen2-vl": "qwen2-vl-7b",
    "internvl": "internvl3-8b",
    "internvl3": "internvl3-8b",
}


def resolve_model(name: str) -> ModelSpec:
    """The spec for a model name or alias (ValueError naming the choices otherwise)."""
    key = ALIASES.get(name, name)
    if key not in MODELS:
        raise ValueError(f"models: unknown model {name!r}; choose from {sorted(MODELS)} or {sorted(ALIASES)}")
    return MODELS[key]


def family_of(config: PretrainedConfig) -> str:
    """The prompt family of a config, from its model_type."""
    kind = config.model_type
    if kind in ("llava_next", "qwen2_vl", "internvl"):
        return kind
    raise ValueError(f"config: unsupported model_type {kind!r} (llava_next, qwen2_vl or internvl)")


def load_config(spec: ModelSpec) -> PretrainedConfig:
    """The shipped real-dimension config of a model (nothing is downloaded)."""
    return AutoConfig.from_pretrained(CONFIG_ROOT / spec.name)


def model_class(config: PretrainedConfig) -> type[nn.Module]:
    """The generation class for a config's family."""
    import transformers

    names = {
        "llava_next": "LlavaNextForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "internvl": "InternVLForConditionalGeneration",
    }
    return getattr(transformers, names[family_of(config)])


def build_model(config: PretrainedConfig, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A random-weight model from ``config``, built directly on ``device`` in ``dtype``, in eval mode."""
    cls = model_class(config)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    return model.eval()


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config inside a multimodal config."""
    return getattr(config, "text_config", config)


def attention_dims(config: PretrainedConfig) -> dict[str, int]:
    """Layers, query heads, kv heads and head dim of the language model."""
    text = text_config(config)
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "layers": int(text.num_hidden_layers),
        "q_heads": heads,
        "kv_heads": int(text.num_key_value_heads),
        "head_dim": int(head_dim),
        "hidden": int(text.hidden_size),
        "intermediate": int(text.intermediate_size),
        "vocab": int(text.vocab_size),
    }


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The language model's decoder layer list (a ModuleList of ``num_layers`` outside the vision tower)."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != num_layers or not name.endswith("layers"):
            continue
        if any(part in name for part in ("vision", "visual")):
            continue
        return module
    raise ValueError("model: no decoder layer list found")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int(params + buffers)
