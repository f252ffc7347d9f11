"""Tiny random-weight models (built from configs, saved and reloaded) and prompts for cache tests."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

PAD, BOS, EOS = 0, 1, 2
TEXT_VOCAB = range(3, 280)  # ordinary text tokens (image / special ids live above 280)
IMAGE_TOKEN = 290

_TEXT = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
}


def text_config(num_layers: int = 3, **extra: Any) -> dict[str, Any]:
    """The tiny language-model settings every family shares, with ``num_layers`` layers and ``extra`` on top."""
    return {**_TEXT, "num_hidden_layers": num_layers, **extra}


def qwen2_vl_config(num_layers: int = 3) -> transformers.Qwen2VLConfig:
    """Qwen2 text with multimodal rope, a one-block vision tower of 14-pixel patches merged 2x2."""
    return transformers.Qwen2VLConfig(
        text_config=text_config(
            num_layers, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        ),
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=291,
        vision_start_token_id=292,
        vision_end_token_id=293,
    )


def llava_next_config(
    num_layers: int = 3,
    pinpoints: list[list[int]] | None = None,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
) -> transformers.LlavaNextConfig:
    """Mistral text, CLIP vision of 28-pixel images; ``text`` / ``vision`` add or replace settings."""
    return transformers.LlavaNextConfig(
        text_config=text_config(num_layers, model_type="mistral", **(text or {})),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
            **(vision or {}),
        },
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[28, 28]] if pinpoints is None else pinpoints,
        vision_feature_layer=-1,
    )


def internvl_config(num_layers: int = 3, image_size: int = 56) -> transformers.InternVLConfig:
    """Qwen2 text, a one-layer vision tower of ``image_size``-pixel square tiles."""
    return transformers.InternVLConfig(
        text_config=text_config(num_layers, model_type="qwen2"),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": [image_size, image_size],
            "patch_size": [14, 14],
        },
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
    )


@dataclass
class TinyModel:
    """A loaded tiny model and how to build its inputs."""

    name: str
    model: Any
    num_layers: int
    num_kv_heads: int
    head_dim: int
    make_inputs: Callable[[list[int]], dict[str, torch.Tensor]]  # text lengths -> left-padded batch


def _text_tokens(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (n,), generator=generator).tolist()


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _seeded(text_lengths: list[int], salt: int) -> list[torch.Generator]:
    """One generator per sequence, seeded by its length: a sequence is the same alone or batched."""
    return [torch.Generator().manual_seed(1000 * salt + n) for n in text_lengths]


def _load(config: Any, cls: type, path: Path, attn_implementation: str) -> Any:
    torch.manual_seed(0)
    model = cls(config)
    model.save_pretrained(path)
    loaded = cls.from_pretrained(path, attn_implementation=attn_implementation, dtype=torch.float32)
    loaded.eval()
    loaded.generation_config.pad_token_id = PAD
    loaded.generation_config.eos_token_id = EOS
    loaded.generation_config.bos_token_id = BOS
    return loaded


def qwen2_vl(path: Path, attn_implementation: str = "sdpa") -> TinyModel:
    config = qwen2_vl_config()
    model = _load(config, transformers.Qwen2VLForConditionalGeneration, path, attn_implementation)

    def make_inputs(text_lengths: list[int]) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for g, n in zip(_seeded(text_lengths, 1), text_lengths, strict=True):
            text = _text_tokens(g, n)
            rows.append([BOS, *text[: n // 3], 292, *([IMAGE_TOKEN] * 16), 293, *text[n // 3 :]])
            pixels.append(torch.randn(64, 3 * 2 * 14 * 14, generator=g))
        ids, mask = _left_pad(rows)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.tensor([[1, 8, 8]] * len(rows)),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
        }

    return TinyModel("qwen2_vl", model, 3, 2, 16, make_inputs)


def llava_next(path: Path, attn_implementation: str = "sdpa") -> TinyModel:
    config = llava_next_config(text={"sliding_window": None})
    model = _load(config, transformers.LlavaNextForConditionalGeneration, path, attn_implementation)

    def make_inputs(text_lengths: list[int]) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for g, n in zip(_seeded(text_lengths, 2), text_lengths, strict=True):
            text = _text_tokens(g, n)
            rows.append([BOS, *text[: n // 4], *([IMAGE_TOKEN] * 10), *text[n // 4 :]])
            pixels.append(torch.randn(1, 2, 3, 28, 28, generator=g))
        ids, mask = _left_pad(rows)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.cat(pixels),
            "image_sizes": torch.tensor([[28, 28]] * len(rows)),
        }

    return TinyModel("llava_next", model, 3, 2, 16, make_inputs)


def internvl(path: Path, attn_implementation: str = "sdpa") -> TinyModel:
    config = internvl_config()
    model = _load(config, transformers.InternVLForConditionalGeneration, path, attn_implementation)

    def make_inputs(text_lengths: list[int]) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for g, n in zip(_seeded(text_lengths, 3), text_lengths, strict=True):
            text = _text_tokens(g, n)
            rows.append([BOS, *text[: n // 2], *([IMAGE_TOKEN] * 4), *text[n // 2 :]])
            pixels.append(torch.randn(1, 3, 56, 56, generator=g))
        ids, mask = _left_pad(rows)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}

    return TinyModel("internvl", model, 3, 2, 16, make_inputs)


def text_lm(
    path: Path, model_type: str = "llama", attn_implementation: str = "sdpa", sliding_window: int | None = None
) -> TinyModel:
    classes: dict[str, tuple[type, type]] = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    extra = {"sliding_window": sliding_window} if model_type == "mistral" else {}
    model = _load(config_cls(**_TEXT, **extra), model_cls, path, attn_implementation)

    def make_inputs(text_lengths: list[int]) -> dict[str, torch.Tensor]:
        rows = [[BOS, *_text_tokens(g, n)] for g, n in zip(_seeded(text_lengths, 4), text_lengths, strict=True)]
        ids, mask = _left_pad(rows)
        return {"input_ids": ids, "attention_mask": mask}

    return TinyModel(model_type, model, 3, 2, 16, make_inputs)


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "qwen2_vl": qwen2_vl,
    "llava_next": llava_next,
    "internvl": internvl,
    "llama": text_lm,
}


def cache_keyword(model: Any) -> str:
    """The generate() keyword that takes a Cache ("cache" in newer transformers, "past_key_values" before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(
    tiny: TinyModel,
    inputs: dict[str, torch.Tensor],
    cache: Any = None,
    new_tokens: int = 16,
    **kwargs: Any,
) -> Any:
    """Greedy generation of exactly ``new_tokens`` tokens (with ``cache`` when given)."""
    extra = dict(kwargs)
    if cache is not None:
        extra[cache_keyword(tiny.model)] = cache
    device = tiny.model.device
    with torch.no_grad():
        return tiny.model.generate(
            **{k: v.to(device) for k, v in inputs.items()},
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **extra,
        )
