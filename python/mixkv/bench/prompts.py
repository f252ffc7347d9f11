"""Prompts of an exact length: one image (the right number of image tokens per family) plus random text.

Image token counts (checked against each model's forward, which raises on a mismatch):
- Qwen2-VL: grid_t * grid_h * grid_w / spatial_merge_size**2 for a grid of 14-pixel patches.
- InternVL: tiles * (image_size / patch_size)**2 * downsample_ratio**2 (256 per 448-pixel tile).
- LLaVA-NeXT (anyres, image_sizes equal to a grid pinpoint, so nothing is unpadded):
  base (S/p)**2 (+1 with the "full" feature strategy) + rows*P * (cols*P + 1), P = S/p,
  rows x cols = pinpoint / S; e.g. 672x672 at S=336, p=14: 576 + 48*(48+1) = 2928.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from mixkv.bench.models import family_of, text_config

MIN_TEXT_TOKENS = 8
QWEN_MAX_GRID = 96  # patches per side: 1344 x 1344 pixels, 2304 image tokens
INTERNVL_MAX_TILES = 13  # 12 tiles + the thumbnail


@dataclass(frozen=True)
class ImageSpec:
    """One image of a family: its geometry and the number of image tokens it expands to."""

    family: str
    tokens: int
    grid: tuple[int, int, int] = (0, 0, 0)  # Qwen2-VL (t, h, w) in patches
    tiles: int = 0  # InternVL tiles; LLaVA-NeXT tiles including the base image
    size: tuple[int, int] = (0, 0)  # LLaVA-NeXT image_sizes (height, width)

    def describe(self) -> str:
        if self.family == "qwen2_vl":
            return f"grid {self.grid[0]}x{self.grid[1]}x{self.grid[2]} -> {self.tokens} image tokens"
        if self.family == "internvl":
            return f"{self.tiles} tiles -> {self.tokens} image tokens"
        return f"{self.size[0]}x{self.size[1]}, {self.tiles} tiles -> {self.tokens} image tokens"


@dataclass(frozen=True)
class PromptInfo:
    """What a built prompt holds."""

    length: int
    batch: int
    image_tokens: int
    text_tokens: int
    image: str


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def qwen2_vl_tokens(config: PretrainedConfig, grid: tuple[int, int, int]) -> int:
    merge = int(config.vision_config.spatial_merge_size)
    t, h, w = grid
    if h % merge or w % merge:
        raise ValueError(f"grid: {grid} is not a multiple of spatial_merge_size {merge}")
    return t * h * w // merge**2


def internvl_tile_tokens(config: PretrainedConfig) -> int:
    height, width = _pair(config.vision_config.image_size)
    ph, pw = _pair(config.vision_config.patch_size)
    ratio = float(config.downsample_ratio)
    return round((height // ph) * (width // pw) * ratio * ratio)


def llava_next_tokens(config: PretrainedConfig, size: tuple[int, int]) -> tuple[int, int]:
    """(image tokens, tiles including the base image) for image_sizes equal to a grid pinpoint."""
    side = int(config.vision_config.image_size)
    per_side = side // int(config.vision_config.patch_size)
    height, width = size
    if height % side or width % side:
        raise ValueError(f"size: {size} is not a multiple of the vision image_size {side}")
    if [height, width] not in [list(p) for p in config.image_grid_pinpoints]:
        raise ValueError(f"size: {size} is not one of image_grid_pinpoints {config.image_grid_pinpoints}")
    rows, cols = height // side, width // side
    base = per_side * per_side + (1 if config.vision_feature_select_strategy == "full" else 0)
    return base + rows * per_side * (cols * per_side + 1), 1 + rows * cols


def choose_image(config: PretrainedConfig, max_tokens: int) -> ImageSpec:
    """The largest default image of the config's family that expands to at most ``max_tokens`` tokens."""
    family = family_of(config)
    if family == "qwen2_vl":
        merge = int(config.vision_config.spatial_merge_size)
        side = min(QWEN_MAX_GRID, math.isqrt(max(max_tokens, 0)) * merge)
        side -= side % merge
        if side <= 0:
            raise ValueError(f"length: too short for an image ({max_tokens} tokens left)")
        grid = (1, side, side)
        return ImageSpec(family, qwen2_vl_tokens(config, grid), grid=grid)
    if family == "internvl":
        per_tile = internvl_tile_tokens(config)
        tiles = min(INTERNVL_MAX_TILES, max_tokens // per_tile)
        if tiles <= 0:
            raise ValueError(f"length: too short for an image ({max_tokens} tokens left)")
        return ImageSpec(family, tiles * per_tile, tiles=tiles)
    options = []
    for pin in config.image_grid_pinpoints:
        size = (int(pin[0]), int(pin[1]))
        tokens, tiles = llava_next_tokens(config, size)
        options.append((tokens, size, tiles))
    fitting = [o for o in options if o[0] <= max_tokens]
    if not fitting:
        raise ValueError(f"length: too short for an image ({max_tokens} tokens left)")
    tokens, size, tiles = max(fitting)
    return ImageSpec(family, tokens, tiles=tiles, size=size)


def _special_ids(config: PretrainedConfig) -> set[int]:
    ids: set[int] = set()
    for source in (config, text_config(config)):
        for attr in (
            "image_token_id",
            "image_token_index",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            value = getattr(source, attr, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
    return ids


def _image_block(config: PretrainedConfig, image: ImageSpec) -> list[int]:
    if image.family == "qwen2_vl":
        inner = [int(config.image_token_id)] * image.tokens
        return [int(config.vision_start_token_id), *inner, int(config.vision_end_token_id)]
    token = config.image_token_id if image.family == "internvl" else config.image_token_index
    return [int(token)] * image.tokens


def _pixels(
    config: PretrainedConfig, image: ImageSpec, batch: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    vision = config.vision_config
    if image.family == "qwen2_vl":
        t, h, w = image.grid
        patch = int(vision.patch_size)
        dim = int(vision.in_channels) * int(vision.temporal_patch_size) * patch * patch
        return {
            "pixel_values": torch.randn(batch * t * h * w, dim, generator=generator),
            "image_grid_thw": torch.tensor([list(image.grid)] * batch),
        }
    if image.family == "internvl":
        height, width = _pair(vision.image_size)
        channels = int(getattr(vision, "num_channels", 3))
        return {"pixel_values": torch.randn(batch * image.tiles, channels, height, width, generator=generator)}
    side = int(vision.image_size)
    channels = int(getattr(vision, "num_channels", 3))
    return {
        "pixel_values": torch.randn(batch, image.tiles, channels, side, side, generator=generator),
        "image_sizes": torch.tensor([list(image.size)] * batch),
    }


def build_inputs(
    config: PretrainedConfig,
    length: int,
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    token_types: bool = True,
) -> tuple[dict[str, torch.Tensor], PromptInfo]:
    """Inputs for ``generate``: ``batch`` prompts of exactly ``length`` tokens, each one image + random text.

    ``token_types`` adds ``mm_token_type_ids`` (1 on image tokens) for Qwen2-VL, which recent
    transformers needs for M-RoPE positions.
    """
    if length <= 0 or batch <= 0:
        raise ValueError(f"length/batch: must be positive (got {length}, {batch})")
    family = family_of(config)
    wrap = 2 if family == "qwen2_vl" else 0
    image = choose_image(config, length - MIN_TEXT_TOKENS - wrap)
    block = torch.tensor(_image_block(config, image))
    text = length - block.numel()
    vocab = int(text_config(config).vocab_size)
    specials = _special_ids(config)
    safe = next(i for i in range(vocab) if i not in specials)
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(0, vocab, (batch, text), generator=generator)
    for special in specials:
        words[words == special] = safe
    head = min(16, text // 2)
    ids = torch.cat([words[:, :head], block.expand(batch, -1), words[:, head:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key, value in _pixels(config, image, batch, generator).items():
        inputs[key] = value.to(dtype) if value.is_floating_point() else value
    if family == "qwen2_vl" and token_types:
        inputs["mm_token_type_ids"] = (ids == int(config.image_token_id)).int()
    moved = {k: v.to(device) for k, v in inputs.items()}
    info = PromptInfo(length, batch, image.tokens, length - image.tokens, image.describe())
    return moved, info
