"""Loading models and building their inputs for the command-line tools.

Two input paths:
- a model directory with a processor (tokenizer + image processor): the processor builds the inputs
  and the answer is decoded to text;
- no processor (the packaged tiny configuration, a saved random-weight model, the real-dimension
  configurations): the inputs are built here - token ids derived from the prompt's bytes and pixel
  values from the image by resizing and normalising - and the answer is a list of token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

# model_type -> transformers class name (image-text models)
VISION_MODELS: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
# text-only causal language models
TEXT_MODELS: tuple[str, ...] = ("qwen2", "mistral", "llama")
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (*VISION_MODELS, *TEXT_MODELS)

REAL_CONFIGS: dict[str, str] = {
    "qwen2-vl-7b": "qwen2-vl-7b",
    "llava-next-mistral-7b": "llava-next-mistral-7b",
    "internvl3-8b": "internvl3-8b",
}

_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
_IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ToolError(Exception):
    """A user-facing error: the commands print its message on one line and exit with status 2."""


def packaged_config_dir(name: str) -> Path:
    """Directory of a configuration shipped in the package: ``tiny`` or one of REAL_CONFIGS."""
    root = resources.files("mixkv")
    if name == "tiny":
        return Path(str(root / "tiny" / "qwen2-vl"))
    if name not in REAL_CONFIGS:
        raise ToolError(f"unknown packaged configuration {name!r}; choose tiny or one of {', '.join(REAL_CONFIGS)}")
    return Path(str(root / "configs" / REAL_CONFIGS[name]))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ToolError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ToolError(f"--device {name!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {name} asked for, but no CUDA device is available")
    return device


@dataclass
class LoadedModel:
    """A model with what the tools need to feed it."""

    model: Any
    model_type: str
    processor: Any | None  # a transformers processor or tokenizer; None: inputs are built here
    random_weights: bool
    source: str

    @property
    def is_vision(self) -> bool:
        return self.model_type in VISION_MODELS

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    @property
    def image_token_id(self) -> int | None:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                return value
        return None


def _model_class(model_type: str) -> Any:
    import transformers

    if model_type in VISION_MODELS:
        return getattr(transformers, VISION_MODELS[model_type])
    if model_type in TEXT_MODELS:
        return transformers.AutoModelForCausalLM
    raise ToolError(f"unknown model type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


def _load_config(path: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "model_type" in str(exc) or isinstance(exc, KeyError):
            raise ToolError(f"unknown model type in {path!r}: {first}") from exc
        raise ToolError(f"cannot load a model configuration from {path!r}: {first}") from exc


_TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _load_processor(path: str, model_type: str) -> Any | None:
    """The model's processor (vision models) or tokenizer (text models); None when the directory has none."""
    local = Path(path)
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer here
    try:
        if model_type in VISION_MODELS:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError):
        return None


def load_model(
    model: str | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load ``model`` (a directory or hub id; None: the packaged tiny configuration, random weights).

    A directory holding a config.json and no weights is built from the configuration with random
    weights, as are the packaged configurations (``tiny``, ``qwen2-vl-7b``, ...).
    """
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if model is None or model in ("tiny", *REAL_CONFIGS):
        path = str(packaged_config_dir(model or "tiny"))
        has_weights = False
    else:
        path = model
        local = Path(model)
        if local.exists() and not local.is_dir():
            raise ToolError(f"--model {model!r} is a file; give a model directory or a model id")
        has_weights = not local.is_dir() or any(
            p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json") for p in local.iterdir()
        )
    config = _load_config(path)
    model_type = str(getattr(config, "model_type", ""))
    cls = _model_class(model_type)
    if has_weights:
        try:
            net = cls.from_pretrained(path, dtype=dtype, **kwargs)
        except OSError as exc:
            raise ToolError(f"cannot load model weights from {path!r}: {str(exc).splitlines()[0]}") from exc
        processor = _load_processor(path, model_type)
    else:
        torch.manual_seed(seed)
        with torch.device(device) if device.type == "cuda" else _null():
            if cls.__name__.startswith("Auto"):
                net = cls.from_config(config, dtype=dtype, **kwargs)
            else:
                net = cls._from_config(config, dtype=dtype, **kwargs)
        processor = None
    net = net.to(device).eval()
    return LoadedModel(net, model_type, processor, random_weights=not has_weights, source=path)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------------------------------------- inputs


@dataclass
class Prepared:
    """Model inputs plus what the tools need to interpret the output."""

    inputs: dict[str, torch.Tensor]
    synthetic: bool
    image_mask: torch.Tensor | None = None  # bool [N]: image-token positions of the (single) prompt
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_length(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])


def load_image(path: str | Path) -> Any:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ToolError(f"image file not found: {str(path)!r}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise ToolError(f"cannot read image {str(path)!r}: {exc}") from exc


def _to_tensor(image: Any, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL image -> float32 [3, H, W], resized (bicubic) and normalised."""
    import numpy as np
    from PIL import Image

    resized = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (arr - m) / s


def _text_ids(text: str, limit: int) -> list[int]:
    """Deterministic token ids from the text's bytes, below ``limit`` (the first special id)."""
    low = 3  # keep clear of pad / bos / eos in small vocabularies
    span = max(limit - low, 1)
    return [low + b % span for b in text.encode("utf-8")] or [low]


def _qwen2_vl_pixels(image: Any, cfg: Any, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patch flattening: pixel_values [t*h*w, C*tp*p*p] and image_grid_thw [1, 3]."""
    p = int(cfg.patch_size)
    m = int(cfg.spatial_merge_size)
    tp = int(cfg.temporal_patch_size)
    unit = p * m
    w0, h0 = image.size
    scale = image_size / max(w0, h0)
    h = max(unit, round(h0 * scale / unit) * unit)
    w = max(unit, round(w0 * scale / unit) * unit)
    x = _to_tensor(image, (h, w), _CLIP_MEAN, _CLIP_STD)  # [C, H, W]
    x = x.unsqueeze(0).expand(tp, -1, -1, -1)  # a still image repeated along time
    c = x.shape[1]
    gh, gw = h // p, w // p
    x = x.reshape(1, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = x.reshape(gh * gw, c * tp * p * p).contiguous()
    return pixels, torch.tensor([[1, gh, gw]], dtype=torch.long)


def _special_floor(loaded: LoadedModel) -> int:
    cfg = loaded.model.config
    vocab = int(loaded.text_config.vocab_size)
    ids = [
        getattr(cfg, n, None)
        for n in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id")
    ]
    ids = [i for i in ids if isinstance(i, int) and 0 < i < vocab]
    # real vocabularies keep their special tokens at the end; ordinary ids stay well below them
    return min([*ids, vocab])


def _synthetic_inputs(loaded: LoadedModel, image: Any | None, prompt: str, image_size: int) -> Prepared:
    cfg = loaded.model.config
    limit = _special_floor(loaded)
    text = _text_ids(prompt, limit)
    bos = getattr(loaded.text_config, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    pixel_inputs: dict[str, torch.Tensor] = {}
    image_ids: list[int] = []
    notes: list[str] = []
    mt = loaded.model_type
    if image is not None and mt in VISION_MODELS:
        tok = loaded.image_token_id
        assert tok is not None
        if mt == "qwen2_vl":
            pixels, grid = _qwen2_vl_pixels(image, cfg.vision_config, image_size)
            n = int(grid.prod()) // int(cfg.vision_config.spatial_merge_size) ** 2
            pixel_inputs = {"pixel_values": pixels, "image_grid_thw": grid}
            image_ids = [int(cfg.vision_start_token_id), *([tok] * n), int(cfg.vision_end_token_id)]
        elif mt == "internvl":
            vc = cfg.vision_config
            side = int(vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size)
            patch = int(vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size)
            tiles = max(1, round(image_size / side)) ** 2
            grid = max(1, round(math.sqrt(tiles)))
            big = _to_tensor(image, (grid * side, grid * side), _IMAGENET_MEAN, _IMAGENET_STD)
            crops = big.unfold(1, side, side).unfold(2, side, side)  # [3, g, g, side, side]
            pixels = crops.permute(1, 2, 0, 3, 4).reshape(grid * grid, 3, side, side)
            per_tile = int((side // patch) ** 2 * float(cfg.downsample_ratio) ** 2)
            pixel_inputs = {"pixel_values": pixels.contiguous()}
            image_ids = [tok] * (per_tile * grid * grid)
        elif mt == "llava_next":
            vc = cfg.vision_config
            side = int(vc.image_size)
            x = _to_tensor(image, (side, side), _CLIP_MEAN, _CLIP_STD)
            pixels = torch.stack([x, x]).unsqueeze(0)  # base view + one tile (the pinpoint [side, side])
            sizes = torch.tensor([[side, side]], dtype=torch.long)
            n = _llava_next_tokens(loaded, pixels, sizes)
            pixel_inputs = {"pixel_values": pixels, "image_sizes": sizes}
            image_ids = [tok] * n
    elif image is not None:
        notes.append("text-only model: the image is ignored")
    ids = torch.tensor([[*head, *text[: len(text) // 2], *image_ids, *text[len(text) // 2 :]]], dtype=torch.long)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixel_inputs}
    tok_id = loaded.image_token_id
    mask = (ids[0] == tok_id) if (tok_id is not None and image_ids) else None
    if mt == "qwen2_vl":
        inputs["mm_token_type_ids"] = (ids == tok_id).int() if tok_id is not None else torch.zeros_like(ids)
    return Prepared(inputs, synthetic=True, image_mask=mask, notes=notes)


def _llava_next_tokens(loaded: LoadedModel, pixels: torch.Tensor, sizes: torch.Tensor) -> int:
    """Image tokens LLaVA-NeXT produces for these pixels (measured by running its vision path)."""
    net = loaded.model
    dev = next(net.parameters()).device
    dt = next(net.parameters()).dtype
    with torch.no_grad():
        out = net.model.get_image_features(pixel_values=pixels.to(dev, dt), image_sizes=sizes.to(dev))
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        return sum(int(f.shape[0]) for f in feats)
    return int(feats.shape[0] if feats.dim() == 2 else feats.shape[0] * feats.shape[1])


def _processor_inputs(loaded: LoadedModel, images: list[Any], prompt: str) -> Prepared:
    proc = loaded.processor
    if not loaded.is_vision:
        text = prompt
        if getattr(proc, "chat_template", None):
            text = proc.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        enc = proc(text, return_tensors="pt")
        return Prepared(dict(enc), synthetic=False)
    content: list[dict[str, str]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": prompt})
    if getattr(proc, "chat_template", None):
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        text = prompt
    enc = proc(text=[text], images=images or None, return_tensors="pt")
    inputs = dict(enc)
    tok = loaded.image_token_id
    mask = (inputs["input_ids"][0] == tok) if tok is not None and images else None
    return Prepared(inputs, synthetic=False, image_mask=mask)


def prepare_inputs(loaded: LoadedModel, image: Any | None, prompt: str, *, image_size: int = 224) -> Prepared:
    """Inputs for one (image, prompt) pair on the model's device (floating inputs in its dtype)."""
    if loaded.processor is not None:
        prepared = _processor_inputs(loaded, [image] if image is not None else [], prompt)
    else:
        prepared = _synthetic_inputs(loaded, image, prompt, image_size)
    dev = next(loaded.model.parameters()).device
    dt = next(loaded.model.parameters()).dtype
    prepared.inputs = {
        k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) if isinstance(v, torch.Tensor) else v
        for k, v in prepared.inputs.items()
    }
    if prepared.image_mask is not None:
        prepared.image_mask = prepared.image_mask.to(dev)
    return prepared


def decode(loaded: LoadedModel, ids: torch.Tensor) -> str:
    """Generated ids -> text (processor path) or the ids themselves (no tokenizer)."""
    proc = loaded.processor
    if proc is not None:
        tok = getattr(proc, "tokenizer", proc)
        return str(tok.decode(ids.tolist(), skip_special_tokens=True))
    return "token ids: " + " ".join(str(int(i)) for i in ids.tolist())


# ----------------------------------------------------------------------------------------------- synthetic images


def synthetic_image(kind: str, size: int, seed: int = 0) -> Any:
    """A PIL image of controlled redundancy: ``tiles`` (one 28-px tile repeated), ``noise`` (i.i.d.
    pixels) or ``mixed`` (left half tiles, right half noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "noise":
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    elif kind == "tiles":
        tile = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
        reps = -(-size // 28)
        arr = np.tile(tile, (reps, reps, 1))[:size, :size]
    elif kind == "mixed":
        left = np.asarray(synthetic_image("tiles", size, seed))
        right = np.asarray(synthetic_image("noise", size, seed + 1))
        arr = np.concatenate([left[:, : size // 2], right[:, size // 2 :]], axis=1)
    else:
        raise ToolError(f"unknown synthetic image kind {kind!r}; choose tiles, noise or mixed")
    return Image.fromarray(np.ascontiguousarray(arr))


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The text decoder's attention modules by layer index (vision towers excluded)."""
    import re

    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if "vision" in name or "visual" in name:
            continue
        match = pattern.search(name)
        if match:
            found[int(match.group(1))] = module
    return dict(sorted(found.items()))
